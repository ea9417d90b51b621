"""The desired-state keys an agent trusts, and how the cloud's key rotation moves them (`cloud/trust/desired.py`).

Theory: a `KeyRing` starts as the keys handed out at enrollment and follows the cloud's chain of signed key lists
(`protos.messages.DesiredStateKeys`). `advance(ring, documents)` is pure: it takes every version the cloud offers
(through TUF, `BundleTrust.desired_key_documents`) and returns the ring at the newest one, or raises a `TrustError`
and the ring stays as it was. Version N is taken only when it follows the ring's version by exactly one, is signed
by `threshold` of the keys the ring trusts, by every key new in it and by its own threshold (the rule of TUF 5.3.4,
plus proof that the cloud holds each new key). So a version the agent missed while down is walked through, one
that skips a step or lacks signatures is refused, and the newest version offered being older than the ring is a
rollback. Revoked keyids are kept forever: a key the cloud revoked is never trusted again, even if named again.

A ring from enrollment does not know its place in the chain (`version` None). The first walk places it at the
newest version that lists exactly its keys (0, before the first rotation, when none does) and goes on from there.

Persisted by the daemon in `{data_dir}/desired_keys.json` (`save_ring`, crash-safe, 0600) before it is used,
with the keyids of the enrollment it grew from: a new enrollment starts again from what the cloud handed out.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from securesystemslib.formats import encode_canonical
from securesystemslib.signer import Key, Signature

from edgefleet.common.fsutil import atomic_write_bytes
from edgefleet.edge_agent.errors import BadSignature, RollbackAttack, TrustError
from edgefleet.protos.messages import DesiredStateKeys, MessageError, SignedDesiredStateKeys, parse_message

log = logging.getLogger(__name__)
RING_VERSION = 1


def parse_keys(entries: list[dict[str, Any]], what: str) -> dict[str, Key]:
    keys: dict[str, Key] = {}
    for entry in entries:
        try:
            body = dict(entry)
            keyid = body.pop("keyid")
            keys[keyid] = Key.from_dict(keyid, body)
        except Exception as exc:  # noqa: BLE001 - KeyError, ValueError, unsupported key type
            raise TrustError(f"a desired-state key {what} is unusable ({exc!r}): enroll again") from None
    return keys


def canonical(payload: Any, what: str) -> bytes:
    try:
        return encode_canonical(payload).encode("utf-8")  # type: ignore[no-any-return,union-attr]
    except Exception as exc:  # noqa: BLE001 - FormatError: floats or other non-canonical values
        raise BadSignature(f"{what} payload has no canonical JSON form ({exc}): refused") from None


def valid_signers(data: bytes, signatures: Any, keys: dict[str, Key]) -> set[str]:
    """The keyids in `keys` with a valid signature over `data` among `signatures` (a list of {keyid, sig})."""
    found: set[str] = set()
    for entry in signatures if isinstance(signatures, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("keyid"), str):
            continue
        keyid, sig = entry["keyid"], entry.get("sig")
        key = keys.get(keyid)
        if key is None or not isinstance(sig, str) or keyid in found:
            continue
        try:
            key.verify_signature(Signature(keyid, sig), data)
        except Exception:  # noqa: BLE001 - UnverifiedSignatureError / VerificationError: not this one
            continue
        found.add(keyid)
    return found


def signer_ids(doc: Any) -> list[str]:
    """The keyids a document's signatures name, valid or not."""
    sigs = doc.get("signatures") if isinstance(doc, dict) else None
    return [e["keyid"] for e in sigs if isinstance(e, dict) and isinstance(e.get("keyid"), str)] \
        if isinstance(sigs, list) else []


@dataclass(frozen=True)
class KeyRing:
    keys: dict[str, Key]
    threshold: int = 1
    version: int | None = None  # place in the cloud's chain of key lists; None: not yet placed (fresh enrollment)
    revoked: frozenset[str] = frozenset()
    enrolled: tuple[str, ...] = field(default=())  # sorted keyids of the enrollment this ring grew from

    @property
    def trust(self) -> tuple[frozenset[str], int, frozenset[str]]:
        """What decides a verification: the trusted keyids, their threshold and the revoked keyids."""
        return frozenset(self.keys), self.threshold, self.revoked

    @classmethod
    def from_enrollment(cls, keys: list[dict[str, Any]]) -> KeyRing:
        parsed = parse_keys(keys, "from enrollment")
        if not parsed:
            raise TrustError("no desired-state keys were given at enrollment: enroll again")
        return cls(keys=parsed, enrolled=tuple(sorted(parsed)))

    def to_dict(self) -> dict[str, Any]:
        return {"ring_version": RING_VERSION, "version": self.version, "threshold": self.threshold,
                "keys": [{**key.to_dict(), "keyid": keyid} for keyid, key in sorted(self.keys.items())],
                "revoked": sorted(self.revoked), "enrolled": list(self.enrolled)}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> KeyRing:
        if doc.get("ring_version") != RING_VERSION:
            raise ValueError(f"unknown ring_version {doc.get('ring_version')!r}")
        version = doc["version"]
        return cls(keys=parse_keys(doc["keys"], "in desired_keys.json"), threshold=int(doc["threshold"]),
                   version=None if version is None else int(version), revoked=frozenset(doc["revoked"]),
                   enrolled=tuple(doc["enrolled"]))


def _parsed(raw: Any) -> SignedDesiredStateKeys:
    try:
        doc: SignedDesiredStateKeys = parse_message(raw, SignedDesiredStateKeys)
    except MessageError as exc:
        raise TrustError(f"the cloud's desired-state key list is malformed: {exc}: refused") from None
    return doc


def _check_version(ring: KeyRing, raw: dict[str, Any], payload: DesiredStateKeys) -> KeyRing:
    """Ring at `payload.version`, or BadSignature when the version is not signed as the chain requires."""
    what = f"desired-state keys v{payload.version}"
    data = canonical(raw["payload"], what)
    sigs = raw.get("signatures")
    by_old = valid_signers(data, sigs, ring.keys)
    if len(by_old) < ring.threshold:
        raise BadSignature(f"{what} is signed by {len(by_old)} of the keys this agent trusts, {ring.threshold} "
                           f"needed (signatures by {[k[:12] for k in signer_ids(raw)]}): refused")
    revoked = ring.revoked | set(payload.revoked)
    keys = parse_keys(payload.keys, f"in {what}")
    if again := sorted(set(keys) & revoked):
        raise BadSignature(f"{what} lists revoked key(s) {[k[:12] for k in again]}: refused")
    by_new = valid_signers(data, sigs, keys)
    if unproven := sorted(set(keys) - set(ring.keys) - by_new):
        raise BadSignature(f"{what} adds key(s) {[k[:12] for k in unproven]} that did not sign it: refused")
    if not 1 <= payload.threshold <= len(keys) or len(by_new) < payload.threshold:
        raise BadSignature(f"{what} is signed by {len(by_new)} of its own keys, its threshold is {payload.threshold}: "
                           "refused")
    return replace(ring, keys=keys, threshold=payload.threshold, version=payload.version, revoked=frozenset(revoked))


def advance(ring: KeyRing, documents: list[dict[str, Any]]) -> KeyRing:
    """The ring after walking the offered versions of the key list (any order); TrustError and no change else."""
    versions: dict[int, tuple[dict[str, Any], DesiredStateKeys]] = {}
    for raw in documents:
        doc = _parsed(raw)
        if doc.payload.version in versions:
            raise TrustError(f"the cloud offered desired-state keys v{doc.payload.version} twice: refused")
        versions[doc.payload.version] = (raw, doc.payload)
    if ring.version is None:
        # Place a fresh enrollment: the newest version that lists exactly the enrolled keys, checked by its own keys.
        same = [v for v, (_, p) in versions.items() if {k.get("keyid") for k in p.keys} == set(ring.keys)]
        if same:
            raw, payload = versions[max(same)]
            data = canonical(raw["payload"], f"desired-state keys v{payload.version}")
            if len(valid_signers(data, raw.get("signatures"), ring.keys)) < payload.threshold:
                raise BadSignature(f"desired-state keys v{payload.version} list the enrolled keys but are not signed "
                                   "by them: refused")
            ring = replace(ring, version=payload.version, threshold=payload.threshold,
                           revoked=ring.revoked | frozenset(payload.revoked))
        else:
            ring = replace(ring, version=0)
    assert ring.version is not None
    newest = max(versions, default=0)
    if versions and newest < ring.version:
        raise RollbackAttack(f"the newest desired-state keys offered are v{newest}, older than v{ring.version} this "
                             "agent already trusts: rollback refused; the agent keeps its keys")
    while ring.version + 1 in versions:
        raw, payload = versions[ring.version + 1]
        ring = _check_version(ring, raw, payload)
    if newest > ring.version:
        raise BadSignature(f"desired-state keys v{newest} cannot be checked from v{ring.version}: v{ring.version + 1} "
                           "is missing (a skipped rotation); refused")
    return ring


def load_ring(path: Path, enrollment_keys: list[dict[str, Any]]) -> KeyRing:
    """The saved ring when it grew from this enrollment's keys, else a fresh one from them."""
    fresh = KeyRing.from_enrollment(enrollment_keys)
    try:
        saved = KeyRing.from_dict(json.loads(Path(path).read_bytes()))
    except FileNotFoundError:
        return fresh
    except (OSError, ValueError, KeyError, TypeError, TrustError) as exc:
        log.error("desired-state keys %s are unreadable (%s): starting again from the enrollment's keys", path, exc)
        return fresh
    if saved.enrolled != fresh.enrolled:
        log.info("a new enrollment: desired-state keys start again from the %d key(s) it gave", len(fresh.keys))
        return fresh
    return saved


def save_ring(path: Path, ring: KeyRing) -> None:
    atomic_write_bytes(path, json.dumps(ring.to_dict(), indent=1, sort_keys=True).encode(), 0o600)
