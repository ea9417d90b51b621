"""common/dsse.py: PAE as the DSSE spec writes it, envelopes that verify, and every way one must not: a changed
payload, another key, another payloadType; and securesystemslib's own DSSE reading our envelopes (and we its)."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edgefleet.common import dsse
from edgefleet.common.errors import SignatureError
from edgefleet.protos.provenance import PAYLOAD_TYPE, DsseEnvelope, DsseSignature, ProvenanceKey

PAYLOAD = b'{"_type": "https://in-toto.io/Statement/v1", "subject": []}'


@pytest.fixture(scope="module")
def private() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def test_pae_is_the_specs_encoding():
    # The test vector of https://github.com/secure-systems-lab/dsse/blob/master/protocol.md
    assert dsse.pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world")
    # Lengths count bytes, not characters.
    assert dsse.pae("t\u00e9", b"\x00\x01") == b"DSSEv1 3 t\xc3\xa9 2 \x00\x01"


def test_a_signed_envelope_verifies_and_gives_back_the_payload(private):
    envelope = dsse.sign(PAYLOAD, PAYLOAD_TYPE, private)
    key = dsse.key_of(private.public_key())
    assert envelope.to_dict()["payloadType"] == PAYLOAD_TYPE and envelope.signatures[0].keyid == key.keyid
    payload, by = dsse.verify(envelope, [key], PAYLOAD_TYPE)
    assert payload == PAYLOAD and by == key
    # The signature is over PAE, not over the payload alone.
    public = private.public_key()
    public.verify(base64.b64decode(envelope.signatures[0].sig), dsse.pae(PAYLOAD_TYPE, PAYLOAD))


def test_a_changed_payload_fails(private):
    envelope = dsse.sign(PAYLOAD, PAYLOAD_TYPE, private)
    changed = envelope.model_copy(update={"payload": base64.b64encode(PAYLOAD.replace(b"[]", b"[1]")).decode()})
    with pytest.raises(SignatureError, match="changed after signing"):
        dsse.verify(changed, [dsse.key_of(private.public_key())], PAYLOAD_TYPE)


def test_another_key_fails_and_the_keyid_hint_is_not_trusted(private):
    envelope = dsse.sign(PAYLOAD, PAYLOAD_TYPE, private)
    other = dsse.key_of(Ed25519PrivateKey.generate().public_key())
    with pytest.raises(SignatureError, match=f"trusted key {other.keyid[:12]}"):
        dsse.verify(envelope, [other], PAYLOAD_TYPE)
    # A key dict that claims the signer's keyid but holds another public key is still another key.
    impostor = other.model_copy(update={"keyid": envelope.signatures[0].keyid})
    with pytest.raises(SignatureError):
        dsse.verify(envelope, [impostor], PAYLOAD_TYPE)
    # Without a keyid, any trusted key is tried.
    bare = envelope.model_copy(update={"signatures": [DsseSignature(sig=envelope.signatures[0].sig)]})
    assert dsse.verify(bare, [other, dsse.key_of(private.public_key())], PAYLOAD_TYPE)[0] == PAYLOAD


def test_another_payload_type_fails_either_way(private):
    envelope = dsse.sign(PAYLOAD, PAYLOAD_TYPE, private)
    key = dsse.key_of(private.public_key())
    with pytest.raises(SignatureError, match="payloadType is 'application/json'"):
        dsse.verify(envelope.model_copy(update={"payload_type": "application/json"}), [key], PAYLOAD_TYPE)
    # A verifier that asks for the changed type still fails: PAE binds the type into the signature.
    with pytest.raises(SignatureError, match="changed after signing"):
        dsse.verify(envelope.model_copy(update={"payload_type": "application/json"}), [key], "application/json")
    with pytest.raises(SignatureError, match="payloadType"):
        dsse.verify(dsse.sign(PAYLOAD, "application/json", private), [key], PAYLOAD_TYPE)


def test_garbage_base64_is_a_signature_error(private):
    envelope = dsse.sign(PAYLOAD, PAYLOAD_TYPE, private)
    with pytest.raises(SignatureError, match="payload is not base64"):
        dsse.verify(envelope.model_copy(update={"payload": "%%%"}), [dsse.key_of(private.public_key())],
                    PAYLOAD_TYPE)


def test_pem_keys_read_as_the_same_key(private):
    pem = private.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    assert dsse.key_from_pem(pem) == dsse.key_of(private.public_key())
    with pytest.raises(SignatureError, match="not a PEM public key"):
        dsse.key_from_pem(b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")


def test_securesystemslib_reads_our_envelopes_and_we_read_its(private):
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import CryptoSigner, SSlibKey

    ours = dsse.sign(PAYLOAD, PAYLOAD_TYPE, private)
    key = dsse.key_of(private.public_key())
    theirs_key = SSlibKey.from_dict(key.keyid, {k: v for k, v in key.to_dict().items() if k != "keyid"})
    assert theirs_key.keyid == key.keyid  # the same keyid rule
    accepted = Envelope.from_dict(ours.to_dict()).verify([theirs_key], 1)
    assert key.keyid in accepted

    signer = CryptoSigner.generate_ed25519()
    envelope = Envelope(payload=PAYLOAD, payload_type=PAYLOAD_TYPE, signatures={})
    envelope.sign(signer)
    theirs = DsseEnvelope.model_validate(envelope.to_dict())
    sslib_key = {**signer.public_key.to_dict(), "keyid": signer.public_key.keyid}
    assert dsse.verify(theirs, [ProvenanceKey.model_validate(sslib_key)], PAYLOAD_TYPE)[0] == PAYLOAD
