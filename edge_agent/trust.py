"""The agent's trust: which desired states and which bundle bytes it accepts.

Theory, in two parts:

* Desired state: the signature covers the securesystemslib canonical JSON of the payload dict as *received* (never
  a re-serialisation of the parsed model). At least one signature from a key pinned at enrollment must verify;
  only then is the document parsed, and then refused unless it names this device and class, carries a generation
  newer than the highest accepted one (replay), and has not expired (freeze).
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
from typing import Any

import urllib3
from securesystemslib.formats import encode_canonical
from securesystemslib.signer import Key, Signature
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
from edgefleet.protos.messages import MAX_MESSAGE_BYTES, DesiredState, MessageError, SignedDesiredState, parse_message

CHUNK_BYTES = 1 << 20  # 1 MiB: streaming hash of bundles of any size in constant memory


# ------------------------------------------------------------------------------------------------- desired state


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


class DesiredStateVerifier:
    def __init__(self, keys: list[dict[str, Any]]) -> None:
        self._keys: dict[str, Key] = {}
        for entry in keys:
            try:
                body = dict(entry)
                keyid = body.pop("keyid")
                self._keys[keyid] = Key.from_dict(keyid, body)
            except Exception as exc:  # noqa: BLE001 - KeyError, ValueError, unsupported key type
                raise TrustError(f"a desired-state key from enrollment is unusable ({exc!r}): enroll again") from None
        if not self._keys:
            raise TrustError("no desired-state keys were given at enrollment: enroll again")

    def verify(self, raw: bytes | str | dict[str, Any], *, device_id: str, device_class: str,
               highest_generation: int | None, now: datetime) -> DesiredState:
        doc = self._decode(raw)
        self._check_signatures(doc)
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

    def _check_signatures(self, doc: dict[str, Any]) -> None:
        payload, sigs = doc.get("payload"), doc.get("signatures")
        if not isinstance(payload, dict):
            raise BadSignature("signed desired state has no payload object: refused")
        if not isinstance(sigs, list) or not sigs:
            raise BadSignature("desired state is unsigned: refused; only documents signed by the cloud are accepted")
        try:
            data = encode_canonical(payload).encode("utf-8")  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001 - FormatError: floats or other non-canonical values
            raise BadSignature(f"desired state payload has no canonical JSON form ({exc}): refused") from None
        seen: list[str] = []
        for entry in sigs:
            if not isinstance(entry, dict) or not isinstance(entry.get("keyid"), str):
                continue
            keyid = entry["keyid"]
            seen.append(keyid[:12])
            key, sig = self._keys.get(keyid), entry.get("sig")
            if key is None or not isinstance(sig, str):
                continue
            try:
                key.verify_signature(Signature(keyid, sig), data)
                return
            except Exception:  # noqa: BLE001 - UnverifiedSignatureError / VerificationError: try the next signature
                continue
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
        return RollbackAttack(f"{what}: TUF metadata is older than what this agent already trusts ({detail}): "
                              "rollback or mix-and-match refused; the agent keeps its newer metadata")
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
