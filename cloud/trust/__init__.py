"""The cloud's trust: the TUF repository that signs bundles as targets, and the signer of desired-state documents.

Agents pin the TUF root at enrollment and verify every bundle's length and hash through `tuf.ngclient`; they verify
desired states against the public keys from `DesiredStateSigner.public_keys()`, moved along the key lists the signer
publishes as TUF targets when its key is rotated. The TUF role keys rotate through new root versions
(`TufRepository.rotate_key`, or `export_root`/`import_root` with the root key offline). See `docs/internals.md`
(Trust, "Key rotation").
"""

from edgefleet.cloud.trust.desired import DesiredStateSigner
from edgefleet.cloud.trust.repository import TargetInfo, TufRepository

__all__ = ["DesiredStateSigner", "TargetInfo", "TufRepository"]
