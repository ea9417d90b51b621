"""Key rotation glue: publishing the desired-state key chain through TUF, and the offline root's files.

Theory: the desired-state key list (`DesiredStateSigner.documents()`, chained by signatures) reaches agents as TUF
targets `trust/desired-state-keys/{N}.json` whose `custom` is the signed document, so an agent reads it from the
targets metadata it verifies anyway (no download), and TUF's rollback and freeze checks cover the chain too; the
agent still checks every version's signatures against the keys it already trusts (`edge_agent/keyring.py`).
`publish_desired_keys` is idempotent and runs before and after each rotation step, so a crash between writing a
version and publishing it is mended by the next step.

Offline root: `export-root` writes root N+1 unsigned (`TufRepository.export_root`), `sign_root_file` signs it where
the root key is kept (it needs no data dir, only the file and the key), `import-root` verifies and installs it
(`TufRepository.import_root`). `take_root_offline` moves the root key out of the data dir.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import load_pem_public_key
from securesystemslib.signer import Key, SSlibKey
from tuf.api.metadata import Metadata, Root

from edgefleet.cloud.errors import Conflict, Invalid
from edgefleet.cloud.trust.desired import DesiredStateSigner
from edgefleet.cloud.trust.keys import file_lock, load_signer
from edgefleet.cloud.trust.repository import TufRepository
from edgefleet.common.fsutil import atomic_write_bytes, fsync_dir
from edgefleet.protos.messages import DESIRED_KEYS_TARGET, SignedDesiredStateKeys

ROTATABLE = ("root", "targets", "snapshot", "timestamp", "desired")


def publish_desired_keys(signer: DesiredStateSigner, repo: TufRepository) -> int:
    """Every version of the desired-state key list as a TUF target; returns the newest version (0: none)."""
    documents = signer.documents()
    for doc in documents:
        repo.add_target(DESIRED_KEYS_TARGET.format(version=doc.payload.version), doc.to_wire(), custom=doc.to_dict())
    return documents[-1].payload.version if documents else 0


def rotate_desired(signer: DesiredStateSigner, repo: TufRepository, *, finish: bool) -> SignedDesiredStateKeys:
    """One step of a desired-state key rotation (`DesiredStateSigner`), published through TUF at once."""
    publish_desired_keys(signer, repo)
    doc = signer.finish_rotation() if finish else signer.start_rotation()
    publish_desired_keys(signer, repo)
    return doc


def read_public_key(path: Path) -> Key:
    """An ed25519 public key from a PEM file (`openssl pkey -pubout`, or `keys sign-root --public-out`)."""
    try:
        return SSlibKey.from_crypto(load_pem_public_key(Path(path).read_bytes()))
    except (OSError, ValueError, TypeError) as exc:
        raise Invalid(f"{path} is not a PEM public key ({exc})") from None


def load_root_file(path: Path) -> Metadata[Root]:
    try:
        md: Metadata[Root] = Metadata[Root].from_bytes(Path(path).read_bytes())
    except OSError as exc:
        raise Invalid(f"cannot read {path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - DeserializationError and friends
        raise Invalid(f"{path} is not TUF root metadata ({exc}): give the file `keys export-root` wrote") from None
    if md.signed.type != Root.type:
        raise Invalid(f"{path} is TUF {md.signed.type} metadata, not root")
    return md


def describe_root(md: Metadata[Root]) -> dict[str, Any]:
    """What a person checks before signing: version, expiry, each role's keyids and threshold, who signed."""
    return {
        "version": md.signed.version,
        "expires": md.signed.expires.isoformat(),
        "roles": {role: {"keyids": list(r.keyids), "threshold": r.threshold} for role, r in md.signed.roles.items()},
        "signed_by": sorted(md.signatures),
    }


def sign_root_file(path: Path, key_paths: list[Path]) -> dict[str, Any]:
    """Add a signature by each private key to the root metadata in `path` (rewritten in place, crash-safe)."""
    md = load_root_file(path)
    for key_path in key_paths:
        try:
            signer = load_signer(Path(key_path))
        except FileNotFoundError:
            raise Invalid(f"no key file {key_path}") from None
        md.sign(signer, append=True)
    atomic_write_bytes(path, md.to_bytes(), 0o644)
    return describe_root(md)


def take_root_offline(repo: TufRepository, out: Path) -> str:
    """Move the root key from the data dir to `out` (0600, never over an existing file); its keyid."""
    src = repo.keys_dir / "root.pem"
    with file_lock(repo.root_dir / ".lock"):
        if not src.exists():
            raise Conflict(f"there is no root key in {repo.keys_dir}: it is offline already")
        data = src.read_bytes()
        keyid = str(load_signer(src).public_key.keyid)  # and checks it reads
        out = Path(out)
        if not atomic_write_bytes(out, data, 0o600, exclusive=True):
            raise Conflict(f"{out} exists: give a new file name")
        # the copy is on disk (fsynced) before the original goes
        os.unlink(src)
        fsync_dir(src.parent)
    return keyid


def root_summary(repo: TufRepository, signer: DesiredStateSigner) -> dict[str, Any]:
    """`keys status`: the TUF roles' keys and expiry, whether root is online, the desired-state key chain."""
    expires = repo.expires()
    documents = signer.documents()
    return {
        "tuf": {
            "root_online": repo.root_online,
            "versions": repo.versions,
            "keyids": repo.keyids(),
            "expires": {role: when.isoformat() for role, when in expires.items()},
        },
        "desired": {
            "version": documents[-1].payload.version if documents else 0,
            "keyids": [k["keyid"] for k in signer.public_keys()],
            "signing": sorted(signer.signing_keyids()),
            "revoked": list(documents[-1].payload.revoked) if documents else [],
            "rotating": signer.rotating,
        },
    }
