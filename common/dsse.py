"""DSSE v1 envelopes signed with ed25519: the cloud signs provenance statements, the CLI verifies them offline.

Theory (https://github.com/secure-systems-lab/dsse/blob/master/protocol.md): a signature covers the
pre-authentication encoding of the payload and its type, never the JSON around them,

    PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body      LEN: ASCII decimal byte count

so a payload cannot be re-read as another type, and the envelope's layout does not matter. The payload travels
base64 (standard; URL-safe is accepted on input, as the spec allows). Verification decodes the payload, builds the
PAE from exactly the bytes and type it received, and accepts when any signature verifies under any trusted key:
`keyid` is an unauthenticated hint, used for messages only. Keys are securesystemslib's dicts, so that
`securesystemslib.dsse.Envelope` verifies these envelopes too (tests/common/test_dsse.py checks it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

from edgefleet.common.errors import SignatureError
from edgefleet.protos.provenance import DsseEnvelope, DsseSignature, ProvenanceKey


def pae(payload_type: str, payload: bytes) -> bytes:
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


def key_of(public: Ed25519PublicKey) -> ProvenanceKey:
    """The securesystemslib form of `public`, with its keyid."""
    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    fields = {"keytype": "ed25519", "scheme": "ed25519", "keyval": {"public": raw.hex()}}
    # securesystemslib's keyid: sha256 over the canonical JSON (sorted keys, no spaces) of the key without it.
    keyid = hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return ProvenanceKey(keyid=keyid, keyval={"public": raw.hex()})


def public_key(key: ProvenanceKey) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(key.keyval.get("public", "")))
    except ValueError:
        raise SignatureError(f"key {key.keyid[:12]} is not an ed25519 public key (keyval.public must be 64 hex "
                             "characters)") from None


def key_from_pem(data: bytes) -> ProvenanceKey:
    """A PEM public key (SubjectPublicKeyInfo, as `openssl pkey -pubout` writes) as a ProvenanceKey."""
    try:
        loaded = load_pem_public_key(data)
    except ValueError as exc:
        raise SignatureError(f"not a PEM public key ({exc})") from None
    if not isinstance(loaded, Ed25519PublicKey):
        raise SignatureError(f"the PEM key is {type(loaded).__name__}, not ed25519")
    return key_of(loaded)


def sign(payload: bytes, payload_type: str, private: Ed25519PrivateKey) -> DsseEnvelope:
    keyid = key_of(private.public_key()).keyid
    sig = private.sign(pae(payload_type, payload))
    return DsseEnvelope(payload=base64.b64encode(payload).decode(), payload_type=payload_type,
                        signatures=[DsseSignature(keyid=keyid, sig=base64.b64encode(sig).decode())])


def _b64(text: str, what: str) -> bytes:
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(text.encode())
        return base64.b64decode(text.encode(), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"the envelope's {what} is not base64") from None


def verify(envelope: DsseEnvelope, keys: Sequence[ProvenanceKey], payload_type: str) -> tuple[bytes, ProvenanceKey]:
    """The payload and the trusted key that signed it; SignatureError when the type is not `payload_type` or no
    signature verifies under any of `keys`."""
    if envelope.payload_type != payload_type:
        raise SignatureError(f"the envelope's payloadType is {envelope.payload_type!r}, not {payload_type!r}")
    if not keys:
        raise SignatureError("no trusted key to verify the envelope with")
    payload = _b64(envelope.payload, "payload")
    message = pae(envelope.payload_type, payload)
    trusted = [(k, public_key(k)) for k in keys]
    for signature in envelope.signatures:
        sig = _b64(signature.sig, "signature")
        for key, public in trusted:
            try:
                public.verify(sig, message)
            except InvalidSignature:
                continue
            return payload, key
    claimed = ", ".join(s.keyid[:12] or "(no keyid)" for s in envelope.signatures)
    pinned = ", ".join(k.keyid[:12] for k in keys)
    raise SignatureError(f"no signature verifies under the trusted key {pinned} (signed by {claimed}): the "
                         "statement was changed after signing, or it is signed by another key")


__all__ = ["key_from_pem", "key_of", "pae", "public_key", "sign", "verify"]
