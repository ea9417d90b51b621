"""Signing of desired-state documents, the control plane's counterpart of TUF for bundles, and rotation of its key.

Theory: the cloud signs the securesystemslib canonical JSON (sorted keys, no whitespace, no floats) of the
desired state's JSON dict with ed25519; the agent checks the same canonical form of the payload dict it *received*,
so neither side depends on how pydantic or the transport lays out the JSON. Replay and freeze protection come from
the payload itself: a rising `generation` and `expires_at`, which the agent enforces (`edge_agent/trust.py`).

Keys, in `key_dir`: `desired_state.pem` (PKCS#8, 0600, made on first start) signs; during a rotation
`desired_state.next.pem` signs too. Which keys agents trust is a chain of signed documents
(`protos.messages.DesiredStateKeys`) kept in `desired_state_keys/{N}.json`: version 0 is implicit (the first key,
as enrollment hands it out), version N lists the keys from then on and is signed by a threshold of version N-1's
keys and by every key new in it. `public_keys()` (what enrollment sends) is the newest version's list. A rotation
takes two steps, so that a document an agent holds is always signed by a key it trusts:

    start_rotation()   N+1 = {old, new}, signed by both; desired states are signed by both from now on
    finish_rotation()  N+2 = {new}, old revoked, signed by new; new becomes desired_state.pem, old is deleted

Each version is also published as a TUF target (`cloud/trust/rotation.py`), which is how agents learn it. Other
processes (`serve` while the `keys` CLI rotates) see a change through the folders' mtimes and reload; changes hold
an flock on `{key_dir}/.lock`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from securesystemslib.formats import encode_canonical
from securesystemslib.signer import CryptoSigner

from edgefleet.cloud.errors import CloudError, Conflict, Invalid
from edgefleet.cloud.trust.keys import LOCK_FILE, file_lock, load_or_create_signer, load_signer, new_signer, promote
from edgefleet.common.fsutil import atomic_write_bytes
from edgefleet.protos.messages import (
    DesiredState,
    DesiredStateKeys,
    MessageError,
    Signature,
    SignedDesiredState,
    SignedDesiredStateKeys,
    parse_message,
)

log = logging.getLogger(__name__)

KEY_FILE = "desired_state.pem"
NEXT_KEY_FILE = "desired_state.next.pem"
DOCS_DIR = "desired_state_keys"


def canonical_bytes(payload: dict[str, Any]) -> bytes:
    """The exact bytes a desired-state signature covers (the agent computes the same over what it received)."""
    return encode_canonical(payload).encode("utf-8")  # type: ignore[union-attr]


def key_dict(signer: CryptoSigner) -> dict[str, Any]:
    key = signer.public_key
    return {**key.to_dict(), "keyid": key.keyid}


def _utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


class DesiredStateSigner:
    def __init__(self, key_dir: Path, *, clock: Callable[[], datetime] = _utcnow) -> None:
        self.key_dir = Path(key_dir)
        self.key_path = self.key_dir / KEY_FILE
        self.next_key_path = self.key_dir / NEXT_KEY_FILE
        self.docs_dir = self.key_dir / DOCS_DIR
        self._clock = clock
        self._lock = threading.RLock()
        self._seen: tuple[int, ...] | None = None
        self._signers: list[CryptoSigner] = []
        self._documents: list[SignedDesiredStateKeys] = []
        with self._lock, file_lock(self._lock_path()):
            self._load()

    # ------------------------------------------------------------------------------------------------ public

    @property
    def keyid(self) -> str:
        """The keyid of `desired_state.pem`, the key that signs outside a rotation."""
        with self._lock:
            self._current()
            return str(self._signers[0].public_key.keyid)

    def signing_keyids(self) -> frozenset[str]:
        """The keys each desired state is signed by now (two during a rotation)."""
        with self._lock:
            self._current()
            return frozenset(s.public_key.keyid for s in self._signers)

    def public_keys(self) -> list[dict[str, Any]]:
        """securesystemslib key dicts with their "keyid": what enrollment sends to agents (the newest version)."""
        with self._lock:
            self._current()
            if self._documents:
                return [dict(k) for k in self._documents[-1].payload.keys]
            return [key_dict(self._signers[0])]

    def documents(self) -> list[SignedDesiredStateKeys]:
        """Every version of the key list, oldest first (empty before the first rotation)."""
        with self._lock:
            self._current()
            return list(self._documents)

    @property
    def rotating(self) -> bool:
        with self._lock:
            self._current()
            return len(self._signers) > 1

    def sign(self, state: DesiredState) -> SignedDesiredState:
        payload = state.model_dump(mode="json")
        try:
            data = canonical_bytes(payload)
        except Exception as exc:  # noqa: BLE001 - securesystemslib FormatError: a float slipped into the payload
            raise Invalid(f"desired state for {state.device_id} cannot be signed: {exc} (canonical JSON has no "
                          "floats; send such values as strings)") from None
        with self._lock:
            self._current()
            sigs = [signer.sign(data) for signer in self._signers]
        return SignedDesiredState(payload=state, signatures=[Signature(keyid=s.keyid, sig=s.signature) for s in sigs])

    def start_rotation(self) -> SignedDesiredStateKeys:
        """Step 1: a new key, listed beside the current one and signing desired states with it."""
        with self._lock, file_lock(self._lock_path()):
            self._load()
            if len(self._signers) > 1:
                raise Conflict("a desired-state key rotation is already under way: finish it first "
                               "(`edgefleet-cloud keys rotate --role desired --finish`)")
            current = self._signers[0]
            fresh = new_signer(self.next_key_path)
            doc = self._append([key_dict(current), key_dict(fresh)], [current, fresh])
            self._load()
            return doc

    def finish_rotation(self) -> SignedDesiredStateKeys:
        """Step 2: the new key alone; the old one is revoked (agents refuse it from then on) and deleted."""
        with self._lock, file_lock(self._lock_path()):
            self._load()
            if len(self._signers) < 2:
                raise Conflict("no desired-state key rotation is under way: start one "
                               "(`edgefleet-cloud keys rotate --role desired`)")
            old, fresh = self._signers
            doc = self._append([key_dict(fresh)], [fresh], revoke=[old.public_key.keyid])
            promote(self.next_key_path, self.key_path)
            self._load()
            return doc

    # ------------------------------------------------------------------------------------------------ internals

    def _lock_path(self) -> Path:
        self.key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self.key_dir / LOCK_FILE

    def _identity(self) -> tuple[int, ...]:
        out: list[int] = []
        for path in (self.key_dir, self.docs_dir):
            try:
                st = os.stat(path)
                out += [st.st_ino, st.st_mtime_ns]
            except FileNotFoundError:
                out += [0, 0]
        return tuple(out)

    def _current(self) -> None:
        if self._identity() != self._seen:
            with file_lock(self._lock_path()):
                self._load()

    def _append(self, keys: list[dict[str, Any]], signers: list[CryptoSigner], *,
                revoke: list[str] | None = None) -> SignedDesiredStateKeys:
        previous = self._documents[-1].payload if self._documents else None
        payload = DesiredStateKeys(
            version=(previous.version if previous else 0) + 1, issued_at=self._clock(), keys=keys,
            revoked=sorted({*(previous.revoked if previous else []), *(revoke or [])}),
        )
        data = canonical_bytes(payload.to_dict())
        sigs = [s.sign(data) for s in signers]
        doc = SignedDesiredStateKeys(payload=payload, signatures=[Signature(keyid=s.keyid, sig=s.signature)
                                                                  for s in sigs])
        self.docs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not atomic_write_bytes(self.docs_dir / f"{payload.version}.json", doc.to_wire(), exclusive=True):
            raise Conflict(f"desired-state keys v{payload.version} appeared meanwhile: run the command again")
        log.info("desired-state keys v%d: %s%s", payload.version, ", ".join(k["keyid"][:12] for k in keys),
                 f"; revoked {', '.join(k[:12] for k in revoke)}" if revoke else "")
        return doc

    def _load(self) -> None:
        """Read the key files and the versions, and pick the signers the newest version lists. With the flock held."""
        seen = self._identity()
        current = load_or_create_signer(self.key_path)
        staged = load_signer(self.next_key_path) if self.next_key_path.exists() else None
        documents = self._read_documents()
        listed = {k["keyid"] for k in documents[-1].payload.keys} if documents else {current.public_key.keyid}
        if staged is not None and staged.public_key.keyid in listed and current.public_key.keyid not in listed:
            promote(self.next_key_path, self.key_path)  # a finish_rotation that stopped after writing its version
            current, staged = staged, None
        signers = [s for s in (current, staged) if s is not None and s.public_key.keyid in listed]
        if len(signers) != len(listed):
            raise CloudError(f"desired-state keys v{len(documents)} in {self.docs_dir} list keys that {self.key_dir} "
                             "does not hold: restore desired_state.pem (and desired_state.next.pem) from backup")
        self._signers, self._documents, self._seen = signers, documents, seen

    def _read_documents(self) -> list[SignedDesiredStateKeys]:
        if not self.docs_dir.is_dir():
            return []
        versions = sorted(int(p.stem) for p in self.docs_dir.glob("*.json") if p.stem.isdigit())
        if versions != list(range(1, len(versions) + 1)):
            raise CloudError(f"desired-state key versions in {self.docs_dir} are not 1..N ({versions}): restore the "
                             "folder from backup")
        out = []
        for version in versions:
            path = self.docs_dir / f"{version}.json"
            try:
                out.append(parse_message(json.loads(path.read_bytes()), SignedDesiredStateKeys))
            except (OSError, ValueError, MessageError) as exc:
                raise CloudError(f"desired-state keys {path} are unreadable ({exc}): restore it from backup") from None
        return out
