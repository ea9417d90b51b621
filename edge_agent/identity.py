"""The device's own key: what makes a re-enrollment provably this device and not a copy of its config.

Theory of operation: at its first start the agent makes an ed25519 key pair and keeps the private key in
`{data_dir}/device_key.pem` (0600, written once with the crash-safe exclusive write, so two starts racing agree on one
key). Every enrollment request carries the public key and an `EnrollProof`: a signature over
`protos.messages.enroll_proof_bytes(...)` (device id, class, public key, a timestamp). The cloud registers the key at
the first enrollment and from then on re-enrolls that device id only for a request signed by the same key with a
newer timestamp (so a recorded request cannot be replayed). A second agent started from a copied config has a key
of its own and is refused, and the real device is never disturbed. A device whose data dir was wiped (a new SD card)
has a new key too: the operator says so with `fleet devices reset ID`, and its next enrollment registers the new key.

The enrollment token alone therefore never re-enrolls an existing device. Deps: `cryptography` (the agent extra has it).
"""

from __future__ import annotations

import base64
import logging
import os
import stat
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.common.fsutil import atomic_write_bytes
from edgefleet.edge_agent.errors import ConfigError
from edgefleet.protos.messages import EnrollProof, enroll_proof_bytes

log = logging.getLogger(__name__)
KEY_FILE = "device_key.pem"


class DeviceKey:
    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public_key = base64.b64encode(raw).decode("ascii")

    @classmethod
    def load_or_create(cls, data_dir: Path) -> DeviceKey:
        path = Path(data_dir) / KEY_FILE
        if not path.exists():
            fresh = Ed25519PrivateKey.generate()
            pem = fresh.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
            if atomic_write_bytes(path, pem, 0o600, exclusive=True):
                log.info("made this device's key %s", path)
                return cls(fresh)
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            log.warning("device key %s was readable by others; setting mode 0600", path)
            os.chmod(path, 0o600)
        try:
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError, OSError) as exc:
            raise ConfigError(f"{path}: the device key is unreadable ({exc}); if the data dir was restored from "
                              "another device, remove the file and ask the operator to run "
                              "`fleet devices reset`") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise ConfigError(f"{path}: the device key is not an ed25519 key; remove it and ask the operator to run "
                              "`fleet devices reset`")
        return cls(private)

    def proof(self, device_id: str, device_class: str, now: datetime) -> EnrollProof:
        data = enroll_proof_bytes(device_id, device_class, self.public_key, now)
        signature = base64.b64encode(self._private.sign(data)).decode("ascii")
        return EnrollProof(signed_at=now, signature=signature)


__all__ = ["KEY_FILE", "DeviceKey"]
