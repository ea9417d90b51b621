"""Signing of desired-state documents, the control plane's counterpart of TUF for bundles.

Theory: the cloud signs the securesystemslib canonical JSON (sorted keys, no whitespace, no floats) of the
desired state's JSON dict with an ed25519 key; the agent checks the same canonical form of the payload dict it
*received*, so neither side depends on how pydantic or the transport lays out the JSON. The key is made on first
start in `{key_dir}/desired_state.pem` (PKCS#8, 0600) and reused; its public half (`public_keys()`) reaches agents
at enrollment. Replay and freeze protection come from the payload itself: a rising `generation` and `expires_at`,
which the agent enforces (`edge_agent/trust.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from securesystemslib.formats import encode_canonical

from edgefleet.cloud.errors import Invalid
from edgefleet.cloud.trust.repository import load_or_create_signer
from edgefleet.protos.messages import DesiredState, Signature, SignedDesiredState

KEY_FILE = "desired_state.pem"


def canonical_bytes(payload: dict[str, Any]) -> bytes:
    """The exact bytes a desired-state signature covers (the agent computes the same over what it received)."""
    return encode_canonical(payload).encode("utf-8")  # type: ignore[union-attr]


class DesiredStateSigner:
    def __init__(self, key_dir: Path) -> None:
        self.key_path = Path(key_dir) / KEY_FILE
        self._signer = load_or_create_signer(self.key_path)

    @property
    def keyid(self) -> str:
        return self._signer.public_key.keyid

    def public_keys(self) -> list[dict[str, Any]]:
        """securesystemslib key dicts with their "keyid": what enrollment sends to agents."""
        key = self._signer.public_key
        return [{**key.to_dict(), "keyid": key.keyid}]

    def sign(self, state: DesiredState) -> SignedDesiredState:
        payload = state.model_dump(mode="json")
        try:
            data = canonical_bytes(payload)
        except Exception as exc:  # noqa: BLE001 - securesystemslib FormatError: a float slipped into the payload
            raise Invalid(f"desired state for {state.device_id} cannot be signed: {exc} (canonical JSON has no "
                          "floats; send such values as strings)") from None
        sig = self._signer.sign(data)
        return SignedDesiredState(payload=state, signatures=[Signature(keyid=sig.keyid, sig=sig.signature)])
