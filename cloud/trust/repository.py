"""The cloud's TUF repository: root, targets, snapshot and timestamp metadata built with python-tuf's Metadata API.

Theory: every bundle is a TUF target. Adding one bumps targets, then snapshot (which pins the targets version), then
timestamp (which pins the snapshot version, length and hash); an agent running `tuf.ngclient` walks that chain from
the root it pinned at enrollment, so it refuses metadata signed by the wrong key, older than what it has seen
(rollback), expired (freeze) or mixed from different repository states. `refresh_timestamp()` re-signs the
short-lived roles before they expire, so a live repository never freezes its agents.

Keys: one ed25519 key per top-level role, made on first start in `{root_dir}/keys/{role}.pem` (PKCS#8, mode 0600,
folder 0700) and reused after. Targets, snapshot and timestamp are online: the repository re-signs them whenever it
must. The root key may live elsewhere (`offline_root`, the setting `tuf_offline_root`): the next root version is then
exported unsigned, signed on the machine that holds the key and imported (`export_root`, `import_root`; the files
are handled in `cloud/trust/rotation.py`, the commands in `cloud/keys_cli.py`), and renewing root before it expires
is the operator's job.

Rotation (TUF 5.3: root N+1 is signed by a threshold of root N's root keys and of its own; the methods are in
`cloud/trust/root_rotation.py`): `rotate_key(role)` with an online root, `import_root` with an offline one. No agent
is refused mid-rotation: the metadata of a role whose key changes is first re-signed by the old *and* the new key
(valid under root N and under root N+1), then root N+1 is written, the new key replaces the old (`{role}.next.pem`
-> `{role}.pem`), and a last timestamp signed by the new keys alone commits. A crash in between leaves a state the
next open completes (a staged key root N+1 lists is promoted). From then on metadata signed by an old key is refused
by every agent that has root N+1.

Processes: `serve`, `worker` and the `keys` commands open the same folder. Every change holds an flock on
`{root_dir}/.lock` and first reloads what another process committed; timestamp.json is always written last, so a new
file under that name is the sign to reload, and reads check it too (one stat).

Layout of `metadata_dir` (`{root_dir}/metadata`), served byte for byte as `/tuf/metadata/{file}`; the repository
uses consistent snapshots (root's `consistent_snapshot` is true), so ngclient asks for exactly these names:

    {N}.root.json       every root version, kept forever (5.3.3: clients walk N+1, N+2, ... until a 404)
    timestamp.json      the only unversioned file; written last, it is the commit point of an update
    {N}.snapshot.json   the last `keep_versions` snapshot versions (5.5.1: fetched by the version in timestamp)
    {N}.targets.json    the last `keep_versions` targets versions (5.6.1: fetched by the version in snapshot)

Versioned files make updates safe under concurrent readers: an agent that read timestamp version t fetches exactly
the snapshot and targets that t names, even while a new target is being published. A missing file must be a 404
(ngclient treats 403/404 on `{N+1}.root.json` as "no newer root"). Targets (bundles) are not served from here and
not hash-prefixed: agents learn length and sha256 here and download `/tuf/targets/{path}` with their own client.

Re-opening a directory loads the keys and the committed state (timestamp -> snapshot -> targets, each checked
against root's keys) and continues the version numbers; nothing is reset. One lock serialises all changes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp

from edgefleet.cloud.errors import CloudError, Invalid
from edgefleet.cloud.trust.keys import LOCK_FILE, file_lock, load_or_create_signer, load_signer, promote
from edgefleet.cloud.trust.root_rotation import OFFLINE_ROOT_HELP, ROLES, SERIALIZER, RootRotation
from edgefleet.common.fsutil import atomic_write_bytes  # the one crash-safe write recipe for cloud and agent

log = logging.getLogger(__name__)

__all__ = ["ROLES", "TARGET_PATH_RE", "TargetInfo", "TufRepository", "load_or_create_signer", "load_signer"]

# Target paths become URL paths and agent file names: letters, digits, '.', '_', '-' and '/' between parts.
TARGET_PATH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class TargetInfo:
    """What the repository signed about one target."""

    path: str
    length: int
    sha256: str


class TufRepository(RootRotation):
    def __init__(
        self,
        root_dir: Path,
        *,
        timestamp_expiry_s: int = 86400,
        snapshot_expiry_s: int = 7 * 86400,
        targets_expiry_s: int = 365 * 86400,
        root_expiry_s: int = 365 * 86400,
        keep_versions: int = 32,
        offline_root: bool = False,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.root_dir = Path(root_dir)
        self.metadata_dir = self.root_dir / "metadata"
        self.keys_dir = self.root_dir / "keys"
        self.offline_root = offline_root
        self._expiry = {
            Root.type: timedelta(seconds=root_expiry_s),
            Targets.type: timedelta(seconds=targets_expiry_s),
            Snapshot.type: timedelta(seconds=snapshot_expiry_s),
            Timestamp.type: timedelta(seconds=timestamp_expiry_s),
        }
        self._keep_versions = max(2, keep_versions)
        self._clock = clock
        self._lock = threading.RLock()
        self._held = 0  # depth of _exclusive() in this process (an flock is not reentrant)
        self._seen: tuple[int, int] | None = None  # timestamp.json as last loaded or written: (inode, mtime)
        self._warned_root: int | None = None  # root version whose coming expiry was logged (offline root)
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        self.keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.keys_dir, 0o700)  # our own folder: private keys only
        self._signers: dict[str, CryptoSigner | None] = {}
        self._md: dict[str, Metadata[Any]] = {}
        self._snapshot_bytes = b""
        self._targets_bytes = b""
        with self._exclusive(reload=False):
            # timestamp.json is the commit point: without it (and past root 1) nothing was ever served, so a first
            # start that died half way simply starts again with the same keys.
            if (self.metadata_dir / "timestamp.json").exists() or self._ever_published():
                self._load()
            else:
                self._create()

    # ------------------------------------------------------------------------------------------------ public

    def root(self) -> dict[str, Any]:
        """The current root metadata (signed) as a dict: what enrollment hands to agents to pin."""
        with self._lock:
            self._current()
            return self._md[Root.type].to_dict()

    @property
    def versions(self) -> dict[str, int]:
        with self._lock:
            self._current()
            return {role: md.signed.version for role, md in self._md.items()}

    @property
    def root_online(self) -> bool:
        """True when the root key is in keys/ (so root can be re-signed and keys rotated without an export)."""
        with self._lock:
            self._current()
            return self._signers.get(Root.type) is not None

    def keyids(self) -> dict[str, list[str]]:
        """The keyids each role's metadata must be signed by, as the current root lists them."""
        with self._lock:
            self._current()
            return {role: list(r.keyids) for role, r in self._md[Root.type].signed.roles.items()}

    def expires(self) -> dict[str, datetime]:
        with self._lock:
            self._current()
            return {role: md.signed.expires for role, md in self._md.items()}

    def get_target(self, target_path: str) -> TargetInfo | None:
        with self._lock:
            self._current()
            tf = self._md[Targets.type].signed.targets.get(target_path)
            return None if tf is None else TargetInfo(tf.path, tf.length, tf.hashes["sha256"])

    def add_target(self, target_path: str, data: bytes, custom: dict[str, Any] | None = None) -> TargetInfo:
        """Sign `data` as target `target_path`: new targets, snapshot and timestamp versions.

        Adding the same bytes (and `custom`) again is a no-op; different bytes replace the target (agents learn the
        new hash). `custom` is application data agents read from the signed targets metadata itself.
        """
        if not isinstance(target_path, str) or not TARGET_PATH_RE.match(target_path) or ".." in target_path:
            raise Invalid(
                f"invalid TUF target path {target_path!r}: use '/'-separated parts of A-Z a-z 0-9 . _ - "
                "with no leading '/', no '..' and no empty parts"
            )
        target = TargetFile.from_data(target_path, data, ["sha256"])
        if custom is not None:
            target.unrecognized_fields["custom"] = custom
        info = TargetInfo(target_path, target.length, target.hashes["sha256"])
        with self._exclusive():
            targets = self._md[Targets.type].signed
            if targets.targets.get(target_path) == target:
                return info
            targets.targets[target_path] = target
            self._publish(targets=True)
            log.info("TUF target %s (%d bytes, sha256 %s) in targets v%d", target_path, info.length, info.sha256,
                     targets.version)
        return info

    def refresh_timestamp(self, force: bool = False) -> bool:
        """Re-sign each role that is past half its expiry period (timestamp always with `force`); True if any was.

        Call it periodically (well under half of `timestamp_expiry_s`) so agents never see an expired timestamp.
        With the root key offline, root is not re-signed here: its coming expiry is logged, once per version.
        """
        with self._exclusive():
            now = self._clock()
            stale = {role for role, md in self._md.items() if md.signed.expires - now < self._expiry[role] / 2}
            if Root.type in stale and self._signers[Root.type] is None:
                stale.discard(Root.type)
                self._warn_root_expiry()
            if not stale and not force:
                return False
            if Root.type in stale:
                self._bump_root()
            self._publish(targets=Targets.type in stale, snapshot=Snapshot.type in stale)
            log.info("TUF metadata re-signed: %s", ", ".join(sorted(stale | {Timestamp.type})))
            return True

    # ------------------------------------------------------------------------------------------------ internals

    @contextmanager
    def _exclusive(self, reload: bool = True) -> Iterator[None]:
        """Only this thread of this process changes the repository; what another process committed is loaded."""
        with self._lock:
            if self._held:
                self._held += 1
                try:
                    yield
                finally:
                    self._held -= 1
                return
            with file_lock(self.root_dir / LOCK_FILE):
                self._held = 1
                try:
                    if reload and self._identity() != self._seen:
                        log.info("TUF repository in %s changed on disk: reloading", self.root_dir)
                        self._load()
                    yield
                finally:
                    self._held = 0

    def _current(self) -> None:
        """With the lock held: reload when another process committed since (one stat when nothing changed)."""
        if self._identity() != self._seen:
            with self._exclusive():
                pass

    def _identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.metadata_dir / "timestamp.json")
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    def _key_path(self, role: str, staged: bool = False) -> Path:
        return self.keys_dir / (f"{role}.next.pem" if staged else f"{role}.pem")

    def _expires(self, role: str) -> datetime:
        return self._clock() + self._expiry[role]

    def _sign(self, role: str, md: Metadata[Any], also: Iterable[CryptoSigner] = ()) -> bytes:
        signer = self._signers[role]
        assert signer is not None, f"no {role} key"
        md.signed.expires = self._expires(role)
        md.sign(signer)
        for extra in also:
            md.sign(extra, append=True)
        return md.to_bytes(SERIALIZER)

    def _create(self) -> None:
        if self.offline_root:
            raise CloudError(f"tuf_offline_root is set, but there is no TUF repository in {self.root_dir} yet: start "
                             "once without it (the root key is made then), then move the key off this machine with "
                             "`edgefleet-cloud keys take-root-offline --out FILE`")
        self._signers = {role: load_or_create_signer(self._key_path(role)) for role in ROLES}
        root = Root(expires=self._expires(Root.type), consistent_snapshot=True)
        for role in ROLES:
            signer = self._signers[role]
            assert signer is not None
            root.add_key(signer.public_key, role)
        self._md[Root.type] = Metadata(root)
        self._write_root()
        self._md[Targets.type] = Metadata(Targets(expires=self._expires(Targets.type)))
        self._md[Snapshot.type] = Metadata(Snapshot(expires=self._expires(Snapshot.type)))
        self._md[Timestamp.type] = Metadata(Timestamp(expires=self._expires(Timestamp.type)))
        # Version 1 of each role, written as-is (no bump): a fresh repository starts at 1.
        self._publish(targets=True, bump=False)
        log.info("created TUF repository in %s", self.root_dir)

    def _bump_root(self) -> None:
        self._md[Root.type].signed.version += 1
        self._write_root()

    def _write_root(self) -> None:
        md = self._md[Root.type]
        data = self._sign(Root.type, md)
        atomic_write_bytes(self.metadata_dir / f"{md.signed.version}.root.json", data)

    def _warn_root_expiry(self) -> None:
        root = self._md[Root.type].signed
        if self._warned_root != root.version:
            self._warned_root = root.version
            log.warning("TUF root v%d expires at %s and its key is offline: renew it before then (%s); agents "
                        "refuse an expired root", root.version, root.expires.isoformat(), OFFLINE_ROOT_HELP)

    def _publish(self, *, targets: bool = False, snapshot: bool = True, bump: bool = True,
                 also: dict[str, list[CryptoSigner]] | None = None) -> None:
        """Write targets (when changed), snapshot, then timestamp; timestamp.json last is the commit point.

        `also`: extra signers per role, for the versions signed by an old and a new key during a rotation."""
        also = also or {}
        step = 1 if bump else 0
        if targets:
            md = self._md[Targets.type]
            md.signed.version += step
            self._targets_bytes = self._sign(Targets.type, md, also.get(Targets.type, ()))
            atomic_write_bytes(self.metadata_dir / f"{md.signed.version}.targets.json", self._targets_bytes)
        if targets or snapshot:
            md = self._md[Snapshot.type]
            md.signed.version += step
            # Version only for targets.json (5.5.5 compares versions; 5.6.4 checks the match).
            md.signed.meta["targets.json"] = MetaFile(self._md[Targets.type].signed.version)
            self._snapshot_bytes = self._sign(Snapshot.type, md, also.get(Snapshot.type, ()))
            atomic_write_bytes(self.metadata_dir / f"{md.signed.version}.snapshot.json", self._snapshot_bytes)
        ts = self._md[Timestamp.type]
        ts.signed.version += step
        # Length and sha256 of the snapshot let clients refuse a swapped snapshot before parsing it (5.5.2).
        ts.signed.snapshot_meta = MetaFile(
            self._md[Snapshot.type].signed.version,
            len(self._snapshot_bytes),
            {"sha256": hashlib.sha256(self._snapshot_bytes).hexdigest()},
        )
        atomic_write_bytes(self.metadata_dir / "timestamp.json",
                           self._sign(Timestamp.type, ts, also.get(Timestamp.type, ())))
        self._seen = self._identity()
        self._prune()

    def _prune(self) -> None:
        for role in (Snapshot.type, Targets.type):
            oldest_kept = self._md[role].signed.version - self._keep_versions + 1
            for path in self.metadata_dir.glob(f"*.{role}.json"):
                version = path.name.split(".", 1)[0]
                if version.isdigit() and int(version) < oldest_kept:
                    path.unlink(missing_ok=True)

    def _versions_of(self, role: str) -> list[int]:
        names = (p.name.split(".", 1)[0] for p in self.metadata_dir.glob(f"*.{role}.json"))
        return sorted(int(v) for v in names if v.isdigit())

    def _root_versions(self) -> list[int]:
        return self._versions_of(Root.type)

    def _ever_published(self) -> bool:
        return any(v > 1 for role in (Root.type, Snapshot.type, Targets.type) for v in self._versions_of(role))

    def _load(self) -> None:
        """Load the committed state: highest root, its keys, then timestamp -> snapshot -> targets as each names."""
        seen = self._identity()
        version = self._root_versions()[-1]
        root_md = self._read(f"{version}.root.json")
        try:
            root_md.verify_delegate(Root.type, root_md)
        except UnsignedMetadataError as exc:
            raise CloudError(f"{version}.root.json in {self.metadata_dir} fails its signature check ({exc}): "
                             "restore the repository from backup") from None
        self._signers = self._load_keys(root_md.signed, version)
        self._md[Root.type] = root_md
        ts = self._read("timestamp.json")
        snap_name = f"{ts.signed.snapshot_meta.version}.snapshot.json"
        self._snapshot_bytes = (self.metadata_dir / snap_name).read_bytes()
        snap = self._read(snap_name)
        targets_name = f"{snap.signed.meta['targets.json'].version}.targets.json"
        self._targets_bytes = (self.metadata_dir / targets_name).read_bytes()
        targets = self._read(targets_name)
        for role, md in ((Timestamp.type, ts), (Snapshot.type, snap), (Targets.type, targets)):
            try:
                root_md.verify_delegate(role, md)
            except UnsignedMetadataError as exc:
                raise CloudError(f"TUF {role} metadata in {self.metadata_dir} fails its signature check ({exc}): "
                                 "it was altered on disk; restore the repository from backup") from None
            self._md[role] = md
        self._seen = seen
        log.info("opened TUF repository in %s at %s", self.root_dir, {r: m.signed.version for r, m in self._md.items()})

    def _load_keys(self, root: Root, version: int) -> dict[str, CryptoSigner | None]:
        """Each role's signer from keys/, checked against `root`; a staged key root lists is promoted (a rotation
        that stopped after writing root N+1). Root's is None when its key is kept elsewhere."""
        signers: dict[str, CryptoSigner | None] = {}
        for role in ROLES:
            path, staged, keyids = self._key_path(role), self._key_path(role, staged=True), root.roles[role].keyids
            if staged.exists() and load_signer(staged).public_key.keyid in keyids and (
                    not path.exists() or load_signer(path).public_key.keyid not in keyids):
                promote(staged, path)
            if not path.exists():
                if role == Root.type:
                    if not self.offline_root and not self._signers:  # said once, at the first open
                        log.warning("the TUF root key %s is not in the data dir: running with an offline root (set "
                                    "tuf_offline_root = true to say so); %s", path, OFFLINE_ROOT_HELP)
                    signers[role] = None
                    continue
                raise CloudError(f"the TUF {role} key {path} is missing: restore it from backup (or rotate it: "
                                 f"`edgefleet-cloud keys export-root FILE --rotate {role}`, sign, import)")
            if role == Root.type and self.offline_root:
                raise CloudError(f"tuf_offline_root is set, but {path} holds the root key: move it off this machine "
                                 "(`edgefleet-cloud keys take-root-offline --out FILE`) or unset tuf_offline_root")
            signer = load_signer(path)
            if signer.public_key.keyid not in keyids:
                raise CloudError(
                    f"the {role} key in {self.keys_dir} is not the one {version}.root.json trusts: restore the "
                    f"matching key from backup, or move {self.root_dir} aside to start a new repository "
                    "(enrolled agents must then enroll again)"
                )
            signers[role] = signer
        return signers

    def _read(self, name: str) -> Metadata[Any]:
        path = self.metadata_dir / name
        try:
            return Metadata.from_bytes(path.read_bytes())
        except FileNotFoundError:
            raise CloudError(
                f"TUF metadata {path} is missing: the repository in {self.root_dir} is incomplete; restore it from "
                "backup"
            ) from None
        except Exception as exc:  # noqa: BLE001 - DeserializationError and friends: a corrupt file
            raise CloudError(f"TUF metadata {path} is corrupt ({exc}): restore it from backup") from None
