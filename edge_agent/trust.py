"""The agent's trust: which desired states and which bundle bytes it accepts.

Theory, in three parts:

* Desired state: the signature covers the securesystemslib canonical JSON of the payload dict as *received* (never
  a re-serialisation of the parsed model). Signatures by `threshold` (1 unless the cloud says more) of the trusted
  keys must verify;
  only then is the document parsed, and then refused unless it names this device and class, carries a generation
  newer than the highest accepted one (replay), and has not expired (freeze).
* Key rotation: the pinned keys are a `keyring.KeyRing`. The cloud announces a new desired-state key, or revokes
  one, in a signed key list it publishes as TUF targets; `BundleTrust.desired_key_documents` reads them (verified
  by TUF) and `DesiredStateVerifier.update_keys` walks them, checking each version's signatures against the keys
  already trusted. A key the cloud revoked is refused from then on.
* Bundles: the cloud is a TUF repository. `BundleTrust` runs `tuf.ngclient` over metadata only (root from
  enrollment -> timestamp -> snapshot -> targets, every spec check: signatures, rollback, freeze, mix-and-match)
  and returns the trusted length and sha256 of a target. The agent's own resumable client downloads the bytes;
  `verify_file` then checks them, streaming. Nothing here downloads a bundle.

Every tuf, securesystemslib or urllib3 error is wrapped here into a `TrustError` whose text is one actionable line.
Deps: tuf, securesystemslib and the stdlib only (the agent extra stays lean).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import urllib3
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile
from tuf.ngclient import Updater

from edgefleet.common.fsutil import atomic_write_bytes
from edgefleet.edge_agent.errors import (
    BadSignature,
    BundleMismatch,
    Expired,
    FrozenRepository,
    MetadataUnavailable,
    Replayed,
    RollbackAttack,
    TrustError,
    UnknownTarget,
    UntrustedMetadata,
    WrongClass,
    WrongDevice,
)
from edgefleet.edge_agent.keyring import KeyRing, advance, canonical, signer_ids, valid_signers
from edgefleet.protos.messages import (
    DESIRED_KEYS_TARGET,
    MAX_MESSAGE_BYTES,
    DesiredState,
    MessageError,
    SignedDesiredState,
    parse_message,
)

CHUNK_BYTES = 1 << 20  # 1 MiB: streaming hash of bundles of any size in constant memory
# 1024: versions of the desired-state key list read per lookup; two per rotation, so centuries of monthly rotations.
MAX_KEY_VERSIONS = 1024


# ------------------------------------------------------------------------------------------------- desired state


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


class DesiredStateVerifier:
    """Checks desired states against a `KeyRing` (the enrollment's keys, moved along the cloud's key rotations)."""

    def __init__(self, keys: list[dict[str, Any]] | None = None, *, ring: KeyRing | None = None) -> None:
        self.ring = ring if ring is not None else KeyRing.from_enrollment(keys or [])
        self.signed_by: frozenset[str] = frozenset()  # the trusted keys that signed the last accepted document

    def update_keys(self, documents: list[dict[str, Any]]) -> bool:
        """Walk the cloud's signed key lists (`keyring.advance`); True when the trusted keys, their threshold or
        the revoked ones changed (not when a fresh enrollment was only placed in the chain). On a TrustError nothing
        changes."""
        before = self.ring
        self.ring = advance(self.ring, documents)
        return self.ring.trust != before.trust

    def names_unknown_key(self, raw: bytes | str | dict[str, Any]) -> bool:
        """True when the document is signed by a key this agent neither trusts nor saw revoked: the cloud may have
        rotated in a key it has not learned yet (worth a look at the key lists, then one more try)."""
        try:
            doc = self._decode(raw)
        except TrustError:
            return False
        return any(k not in self.ring.keys and k not in self.ring.revoked for k in signer_ids(doc))

    def verify(self, raw: bytes | str | dict[str, Any], *, device_id: str, device_class: str,
               highest_generation: int | None, now: datetime) -> DesiredState:
        doc = self._decode(raw)
        signed_by = self._check_signatures(doc)
        try:
            signed = parse_message(doc, SignedDesiredState)
        except MessageError as exc:
            raise TrustError(f"signed desired state is malformed: {exc}") from None
        state: DesiredState = signed.payload
        if state.device_id != device_id:
            raise WrongDevice(f"desired state is for device {state.device_id!r}, not this device {device_id!r}: "
                              "refused; check the device id in the agent config")
        if state.device_class != device_class:
            raise WrongClass(f"desired state is for device class {state.device_class!r}, but this device is "
                             f"{device_class!r}: refused; re-enroll with the right class")
        if highest_generation is not None and state.generation <= highest_generation:
            raise Replayed(f"desired state generation {state.generation} is not newer than the accepted generation "
                           f"{highest_generation}: replayed or stale document refused")
        if _utc(state.expires_at) <= _utc(now):
            raise Expired(f"desired state generation {state.generation} expired at {state.expires_at.isoformat()}: "
                          "refused; the cloud re-signs documents before expiry, so check the clocks and the link")
        self.signed_by = frozenset(signed_by)
        return state

    @staticmethod
    def _decode(raw: bytes | str | dict[str, Any]) -> dict[str, Any]:
        if isinstance(raw, dict):
            return raw
        if not isinstance(raw, (bytes, bytearray, str)):
            raise TrustError(f"desired state must be JSON bytes or a dict, got {type(raw).__name__}")
        if len(raw) > MAX_MESSAGE_BYTES:
            raise TrustError(f"desired state of {len(raw)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit: refused")
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise TrustError(f"desired state is not valid UTF-8 JSON ({exc}): refused") from None
        if not isinstance(doc, dict):
            raise TrustError(f"desired state must be a JSON object, got a JSON {type(doc).__name__}: refused")
        return doc

    def _check_signatures(self, doc: dict[str, Any]) -> set[str]:
        payload, sigs = doc.get("payload"), doc.get("signatures")
        if not isinstance(payload, dict):
            raise BadSignature("signed desired state has no payload object: refused")
        if not isinstance(sigs, list) or not sigs:
            raise BadSignature("desired state is unsigned: refused; only documents signed by the cloud are accepted")
        valid = valid_signers(canonical(payload, "desired state"), sigs, self.ring.keys)
        if len(valid) >= self.ring.threshold:
            return valid
        seen = [k[:12] for k in signer_ids(doc)]
        if valid:
            raise BadSignature(f"desired state is signed by {len(valid)} trusted key(s), {self.ring.threshold} needed "
                               f"(signatures by {seen}): refused")
        revoked = [k[:12] for k in signer_ids(doc) if k in self.ring.revoked]
        if revoked:
            raise BadSignature(f"desired state is signed by revoked key(s) {revoked} and no trusted one: the cloud "
                               "rotated its desired-state key; refused")
        raise BadSignature(
            f"no valid signature on the desired state from a trusted key (signatures by {seen or 'nobody'}): "
            "tampered or signed by an unknown key; refused"
        )


# ------------------------------------------------------------------------------------------------- bundles (TUF)


@dataclass(frozen=True)
class TrustedTarget:
    path: str
    length: int
    sha256: str
    target_file: TargetFile


def _wrap(exc: BaseException, what: str) -> TrustError:
    """One line per tuf/urllib3 failure, typed so the daemon can tell attack, freeze and outage apart."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, tuf_exc.UnsignedMetadataError):
        return UntrustedMetadata(f"{what}: TUF metadata is not signed by the trusted keys ({detail}): refused; "
                                 "the server or the path to it is not trustworthy")
    if isinstance(exc, tuf_exc.LengthOrHashMismatchError):
        return UntrustedMetadata(f"{what}: TUF metadata does not match the hash its parent signed ({detail}): "
                                 "refused (mix-and-match or tampering)")
    if isinstance(exc, tuf_exc.BadVersionNumberError):
        return RollbackAttack(f"{what}: TUF metadata is older than what this agent already trusts, or not the next "
                              f"version ({detail}): rollback, skipped root or mix-and-match refused; the agent keeps "
                              "its newer metadata")
    if isinstance(exc, tuf_exc.ExpiredMetadataError):
        return FrozenRepository(f"{what}: TUF metadata has expired ({detail}): refused as a possible freeze "
                                "attack; the cloud must re-sign it (TufRepository.refresh_timestamp), or check the "
                                "device clock")
    if isinstance(exc, (tuf_exc.DownloadError, urllib3.exceptions.HTTPError)):
        return MetadataUnavailable(f"{what}: TUF metadata could not be fetched ({detail}): retry later")
    if isinstance(exc, tuf_exc.RepositoryError):
        return UntrustedMetadata(f"{what}: TUF metadata is invalid ({detail}): refused")
    if isinstance(exc, OSError):
        return TrustError(f"{what}: local TUF metadata cache unusable ({detail}): check disk space and permissions")
    return TrustError(f"{what}: TUF update failed ({type(exc).__name__}: {detail})")


@runtime_checkable
class KeyDocumentSource(Protocol):
    """Where the daemon learns the cloud's desired-state key lists (`BundleTrust`; in-memory ones in tests)."""

    def desired_key_documents(self) -> list[dict[str, Any]]:
        """Every version of the signed key list, as dicts; TrustError when they cannot be had."""
        ...


class BundleTrust:
    """TUF metadata client for bundles. Single instance per `metadata_dir`; calls are serialised."""

    def __init__(self, metadata_dir: Path, metadata_url: str, trusted_root: dict[str, Any] | bytes | None = None,
                 fetcher: Any = None) -> None:
        self.metadata_dir = Path(metadata_dir)
        self.metadata_url = metadata_url if metadata_url.endswith("/") else metadata_url + "/"
        if isinstance(trusted_root, dict):
            trusted_root = json.dumps(trusted_root, sort_keys=True).encode()
        self._root = trusted_root
        self._fetcher = fetcher
        self._lock = threading.Lock()

    def _updater(self) -> Updater:
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        root_file = self.metadata_dir / "root.json"
        if self._root is not None and not os.path.lexists(root_file):
            atomic_write_bytes(root_file, self._root)  # the trust anchor survives a power cut whole, or not at all
        elif self._root is None and not root_file.exists():
            raise TrustError(f"no trusted TUF root in {self.metadata_dir}: enroll the device first")
        # The enrollment root is the trust anchor; newer roots cached in root_history/ are re-verified from it (5.3).
        # Without one (a restart that lost it), the cached root.json, itself written only after verification.
        return Updater(str(self.metadata_dir), self.metadata_url, fetcher=self._fetcher, bootstrap=self._root)

    def target_info(self, target_path: str) -> TrustedTarget:
        """Refresh TUF metadata (5.3 root, 5.4 timestamp, 5.5 snapshot, 5.6 targets) and look up `target_path`."""
        what = f"bundle {target_path}"
        with self._lock:
            try:
                # An Updater refreshes once in its life, so each lookup builds one on the persisted trusted state.
                updater = self._updater()
                updater.refresh()
                info = updater.get_targetinfo(target_path)
            except TrustError:
                raise
            except Exception as exc:  # tuf, urllib3 and OS errors, wrapped once here
                raise _wrap(exc, what) from exc
        if info is None:
            raise UnknownTarget(f"{what} is not a trusted target in the cloud's signed TUF metadata: refused; "
                                "deploy it again from the cloud")
        sha256 = info.hashes.get("sha256")
        if not sha256:
            raise UnknownTarget(f"{what} has no sha256 in its TUF metadata: refused")
        return TrustedTarget(info.path, info.length, sha256, info)

    def desired_key_documents(self) -> list[dict[str, Any]]:
        """Refresh TUF metadata and return every version of the cloud's desired-state key list, oldest first: the
        `custom` of targets trust/desired-state-keys/{N}.json, read from the verified targets metadata (no download).
        The agent still checks their signatures (`DesiredStateVerifier.update_keys`)."""
        what = "desired-state keys"
        with self._lock:
            try:
                updater = self._updater()
                updater.refresh()
                found: list[dict[str, Any]] = []
                for version in range(1, MAX_KEY_VERSIONS + 1):
                    info = updater.get_targetinfo(DESIRED_KEYS_TARGET.format(version=version))
                    if info is None:
                        break
                    if not isinstance(info.custom, dict):
                        raise TrustError(f"{what} v{version} in the TUF targets carry no document: refused")
                    found.append(info.custom)
            except TrustError:
                raise
            except Exception as exc:  # tuf, urllib3 and OS errors, wrapped once here
                raise _wrap(exc, what) from exc
        return found

    def verify_file(self, path: Path, target: TrustedTarget) -> None:
        """5.7.3: the downloaded bytes must have exactly the trusted length and every trusted hash."""
        try:
            hashers = {alg: hashlib.new(alg) for alg in target.target_file.hashes}
        except ValueError as exc:
            raise BundleMismatch(f"bundle {target.path}: unsupported hash algorithm in TUF metadata ({exc})") from None
        size = 0
        try:
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK_BYTES):
                    size += len(chunk)
                    if size > target.length:
                        break
                    for h in hashers.values():
                        h.update(chunk)
        except OSError as exc:
            raise BundleMismatch(f"bundle {target.path}: cannot read {path} ({exc}): download it again") from None
        if size != target.length:
            got = f"more than {target.length}" if size > target.length else str(size)
            raise BundleMismatch(f"bundle {target.path}: {path} has {got} bytes, the signed length is "
                                 f"{target.length}: refused; delete it and download again")
        for alg, h in hashers.items():
            if not hmac.compare_digest(h.hexdigest(), target.target_file.hashes[alg]):
                raise BundleMismatch(f"bundle {target.path}: {alg} of {path} does not match the signed hash: "
                                     "corrupted or tampered download refused; delete it and download again")
