"""Root rotation for `TufRepository` (TUF 5.3): new keys for roles through root N+1, online or with an offline root.

Theory: root N+1 must be signed by a threshold of root N's root keys and by a threshold of its own (5.3.4); an agent
that pinned an older root walks N+1, N+2, ... one by one, so every version stays published. `rotate_key` makes a new
key and signs root N+1 here (the root key is in the data dir); with the root key offline, `export_root` writes root
N+1 unsigned (new online keys staged as `{role}.next.pem`), it is signed where the root key is
(`rotation.sign_root_file`), and `import_root` checks both thresholds before installing it. Either way
`_install_root` publishes in an order under which no agent is refused (repository.py, "Rotation").

A mixin: it works on the repository's state and runs under its `_exclusive()` lock; `TufRepository` is the only
class that uses it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner, Key
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from edgefleet.cloud.errors import Invalid
from edgefleet.cloud.trust.keys import load_signer, new_signer, promote
from edgefleet.common.fsutil import atomic_write_bytes

log = logging.getLogger(__name__)

ROLES = (Root.type, Targets.type, Snapshot.type, Timestamp.type)
ONLINE_ROLES = (Targets.type, Snapshot.type, Timestamp.type)
SERIALIZER = JSONSerializer(compact=False)
OFFLINE_ROOT_HELP = ("the root key is offline: run `edgefleet-cloud keys export-root FILE`, sign FILE where the root "
                     "key is (`edgefleet-cloud keys sign-root FILE --key root.pem`), then "
                     "`edgefleet-cloud keys import-root FILE`")


class RootRotation:
    # Provided by TufRepository.
    metadata_dir: Path
    _md: dict[str, Metadata[Any]]
    _signers: dict[str, CryptoSigner | None]
    _clock: Callable[[], datetime]
    _exclusive: Callable[[], AbstractContextManager[None]]
    _key_path: Callable[..., Path]
    _expires: Callable[[str], datetime]
    _publish: Callable[..., None]

    def rotate_key(self, role: str) -> str:
        """Replace `role`'s key with a new one, through root N+1; the new keyid.

        Needs the root key here; with an offline root, use `export_root(rotate=[role])` and `import_root`.
        """
        if role not in ROLES:
            raise Invalid(f"unknown TUF role {role!r}: one of {', '.join(ROLES)}")
        with self._exclusive():
            root_signer = self._signers[Root.type]
            if root_signer is None:
                raise Invalid(f"cannot rotate the {role} key here: {OFFLINE_ROOT_HELP} (with `--rotate {role}`)")
            fresh = new_signer(self._key_path(role, staged=True))
            md = self._next_root({role: fresh.public_key})
            md.sign(root_signer)  # root N's threshold
            if role == Root.type:
                md.sign(fresh, append=True)  # and root N+1's own
            self._install_root(md, {role: fresh})
            return str(fresh.public_key.keyid)

    def export_root(self, *, rotate: Iterable[str] = (), root_keys: list[Key] | None = None,
                    root_threshold: int = 1) -> bytes:
        """The next root version, unsigned, for signing where the root key is (`import_root` installs it).

        `rotate`: online roles that get a new key, staged in keys/{role}.next.pem until the import. `root_keys`:
        the root keys of the new version (a root key rotation), `root_threshold` of them must sign what follows.
        """
        rotate = list(dict.fromkeys(rotate))
        for role in rotate:
            if role not in ONLINE_ROLES:
                raise Invalid(f"cannot stage a key for {role!r} here: one of {', '.join(ONLINE_ROLES)} (a new root "
                              "key is made where the root key is kept, and given as --root-key)")
        if root_keys is not None and not 1 <= root_threshold <= len(root_keys):
            raise Invalid(f"root threshold {root_threshold} needs between 1 and {len(root_keys)} root keys")
        with self._exclusive():
            md = self._next_root({role: new_signer(self._key_path(role, staged=True)).public_key for role in rotate})
            if root_keys is not None:
                root = md.signed
                for keyid in list(root.roles[Root.type].keyids):
                    root.revoke_key(keyid, Root.type)
                for key in root_keys:
                    root.add_key(key, Root.type)
                root.roles[Root.type].threshold = root_threshold
            return md.to_bytes(SERIALIZER)

    def import_root(self, data: bytes) -> int:
        """Verify root N+1 (signed by root N's threshold and its own, 5.3.4) and publish it; its version."""
        try:
            md = Metadata[Root].from_bytes(data)
        except Exception as exc:  # noqa: BLE001 - DeserializationError and friends: not TUF metadata
            raise Invalid(f"not TUF root metadata ({exc}): give the file `keys export-root` wrote") from None
        if md.signed.type != Root.type:
            raise Invalid(f"this is TUF {md.signed.type} metadata, not root: give the file `keys export-root` wrote")
        with self._exclusive():
            current = self._md[Root.type].signed
            new = md.signed
            if new.version != current.version + 1:
                raise Invalid(f"root v{new.version} does not follow the current root v{current.version}: export "
                              "the next root again (`edgefleet-cloud keys export-root`) and sign that")
            result = new.get_root_verification_result(current, md.signed_bytes, md.signatures)
            if not result.verified:
                raise Invalid(
                    f"root v{new.version} is not signed enough: it needs {result.first.threshold} signature(s) by "
                    f"root v{current.version}'s root keys (has {len(result.first.signed)}) and "
                    f"{result.second.threshold} by its own (has {len(result.second.signed)}); sign it with "
                    "`edgefleet-cloud keys sign-root FILE --key KEY.pem` where those keys are kept"
                )
            if new.expires <= self._clock():
                raise Invalid(f"root v{new.version} expired at {new.expires.isoformat()}: export a new one")
            if new.consistent_snapshot is not True:
                raise Invalid("the root must keep consistent_snapshot true: this repository serves versioned files")
            self._install_root(md, self._staged_for(new))
            return int(new.version)

    # ------------------------------------------------------------------------------------------------ internals

    def _next_root(self, replace: dict[str, Key]) -> Metadata[Root]:
        """Root N+1, unsigned: root N with a fresh expiry and each role in `replace` given that key alone."""
        md: Metadata[Root] = Metadata.from_dict(copy.deepcopy(self._md[Root.type].to_dict()))
        root = md.signed
        root.version += 1
        root.expires = self._expires(Root.type)
        for role, key in replace.items():
            for keyid in list(root.roles[role].keyids):
                root.revoke_key(keyid, role)
            root.add_key(key, role)
        md.signatures.clear()
        return md

    def _staged_for(self, new: Root) -> dict[str, CryptoSigner]:
        """The signers an imported root needs that are not the current ones: staged keys it names. Invalid when it
        names an online key this cloud does not hold."""
        staged: dict[str, CryptoSigner] = {}
        for role in ROLES:
            keyids, held = new.roles[role].keyids, self._signers[role]
            if role == Root.type:
                if held is not None and held.public_key.keyid not in keyids:
                    raise Invalid("this root drops the root key kept in the data dir: take that key offline first "
                                  "(`edgefleet-cloud keys take-root-offline --out FILE`), then import the root")
                continue
            if len(keyids) != 1 or new.roles[role].threshold != 1:
                raise Invalid(f"this repository signs {role} with one online key: the root must list one {role} key "
                              "with threshold 1")
            if held is not None and keyids[0] == held.public_key.keyid:
                continue
            path = self._key_path(role, staged=True)
            signer = load_signer(path) if path.exists() else None
            if signer is None or signer.public_key.keyid != keyids[0]:
                raise Invalid(f"the root lists a {role} key ({keyids[0][:12]}) this cloud does not hold: export the "
                              f"root again here (`edgefleet-cloud keys export-root FILE --rotate {role}`) and sign it")
            staged[role] = signer
        return staged

    def _install_root(self, md: Metadata[Root], staged: dict[str, CryptoSigner]) -> None:
        """Publish root N+1 (signed) so that no agent is refused on the way (repository.py's docstring, "Rotation")."""
        changed = [role for role in ONLINE_ROLES if role in staged]
        if changed:
            # 1. what the changed keys sign, signed by the old and the new: valid under root N and root N+1
            self._publish(targets=Targets.type in changed, snapshot=bool({Targets.type, Snapshot.type} & set(changed)),
                          also={role: [staged[role]] for role in changed})
        # 2. root N+1; 3. the new keys replace the old (a crash before this is completed by the next _load)
        self._md[Root.type] = md
        atomic_write_bytes(self.metadata_dir / f"{md.signed.version}.root.json", md.to_bytes(SERIALIZER))
        for role, signer in staged.items():
            promote(self._key_path(role, staged=True), self._key_path(role))
            self._signers[role] = signer
        # 4. a timestamp signed by the new keys alone: the commit other processes reload on
        self._publish(snapshot=False)
        log.info("TUF root v%d published; new keys for %s", md.signed.version, ", ".join(staged) or "no role")
