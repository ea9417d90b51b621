"""The agent's trust: desired-state verification, and TUF bundle trust over a real HTTP server and real ngclient.

The cloud side is the real `TufRepository`; `TufMetadataServer` serves its metadata folder at /tuf/metadata/ and
lets a test swap one file to play the attacker (wrong key, rollback, mix-and-match, freeze).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata

from edgefleet.cloud.trust import DesiredStateSigner, TufRepository
from edgefleet.cloud.trust.desired import KEY_FILE, canonical_bytes
from edgefleet.cloud.trust.repository import load_or_create_signer
from edgefleet.edge_agent.errors import (
    BadSignature,
    CloudUnavailable,
    Expired,
    Replayed,
    TrustError,
    WrongClass,
    WrongDevice,
)
from edgefleet.edge_agent.trust import (
    BundleMismatch,
    BundleTrust,
    DesiredStateVerifier,
    FrozenRepository,
    MetadataUnavailable,
    RollbackAttack,
    UnknownTarget,
    UntrustedMetadata,
)
from edgefleet.protos.messages import DesiredModel, DesiredState
from tests.harness import free_port, wait_for
from tests.tuf_server import TufMetadataServer

A, B = "bundles/digits/v1/rpi4.tar.gz", "bundles/digits/v2/rpi4.tar.gz"
DATA_A, DATA_B = b"A" * 5000, b"B" * 7000


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def repo(tmp_path: Path) -> TufRepository:
    return TufRepository(tmp_path / "cloud")


@pytest.fixture
def server(tmp_path: Path):
    """Serves {tmp_path}/cloud/metadata, where the `repo` fixture (or a test's own repository) keeps its files."""
    srv = TufMetadataServer(tmp_path / "cloud" / "metadata").start()
    try:
        yield srv
    finally:
        srv.stop()


def agent(tmp_path: Path, repo: TufRepository, server: TufMetadataServer, name: str = "agent") -> BundleTrust:
    return BundleTrust(tmp_path / name / "tuf", server.url, trusted_root=repo.root())


def resigned(raw: bytes, bump: int = 0, **changes) -> bytes:
    """The attacker's copy: metadata changed as asked and signed with a fresh key the root does not trust."""
    md = Metadata.from_bytes(raw)
    md.signed.version += bump
    for name, value in changes.items():
        setattr(md.signed, name, value)
    md.sign(CryptoSigner.generate_ed25519())
    return md.to_bytes()


# ------------------------------------------------------------------------------------------------ TUF: happy path


def test_trusted_length_and_hash_then_a_newer_target(tmp_path: Path, repo, server):
    repo.add_target(A, DATA_A)
    trust = agent(tmp_path, repo, server)
    info = trust.target_info(A)
    assert (info.path, info.length, info.sha256) == (A, len(DATA_A), hashlib.sha256(DATA_A).hexdigest())
    bundle = tmp_path / "a.tar.gz"
    bundle.write_bytes(DATA_A)
    trust.verify_file(bundle, info)

    repo.add_target(B, DATA_B)  # targets/snapshot/timestamp v3: the agent picks them up on its next lookup
    info_b = trust.target_info(B)
    assert info_b.sha256 == hashlib.sha256(DATA_B).hexdigest()
    assert trust.target_info(A).sha256 == info.sha256
    # consistent snapshots: versioned snapshot/targets, only metadata fetched, never a bundle
    assert {"/tuf/metadata/timestamp.json", "/tuf/metadata/3.snapshot.json", "/tuf/metadata/3.targets.json",
            "/tuf/metadata/2.root.json"} <= set(server.requests)
    assert all(p.startswith("/tuf/metadata/") for p in server.requests)


def test_unknown_target_is_refused(tmp_path: Path, repo, server):
    repo.add_target(A, DATA_A)
    with pytest.raises(UnknownTarget, match="not a trusted target"):
        agent(tmp_path, repo, server).target_info("bundles/evil/v1/rpi4.tar.gz")


def test_restart_without_root_uses_the_cached_trusted_state(tmp_path: Path, repo, server):
    repo.add_target(A, DATA_A)
    agent(tmp_path, repo, server).target_info(A)
    restarted = BundleTrust(tmp_path / "agent" / "tuf", server.url)
    assert restarted.target_info(A).length == len(DATA_A)
    with pytest.raises(TrustError, match="enroll the device first"):
        BundleTrust(tmp_path / "other" / "tuf", server.url).target_info(A)


def test_the_enrollment_root_is_written_crash_safe(tmp_path: Path, repo, server, monkeypatch):
    """The trust anchor goes through the one crash-safe write: whole file, then the folder fsynced."""
    from edgefleet.common import fsutil

    synced = []
    monkeypatch.setattr(fsutil, "fsync_dir", lambda p: synced.append(Path(p).resolve()))
    trust = agent(tmp_path, repo, server)
    with pytest.raises(TrustError):  # nothing is deployed yet; the root is written before the refresh all the same
        trust.target_info(A)
    metadata = (tmp_path / "agent" / "tuf").resolve()
    assert metadata in synced
    assert json.loads((metadata / "root.json").read_bytes())["signed"]["_type"] == "root"
    assert [p.name for p in metadata.iterdir() if ".tmp" in p.name] == []


def test_unreachable_server_is_a_retryable_trust_error(tmp_path: Path, repo):
    trust = BundleTrust(tmp_path / "tuf", f"http://127.0.0.1:{free_port()}/tuf/metadata/", trusted_root=repo.root())
    with pytest.raises(MetadataUnavailable, match="could not be fetched") as err:
        trust.target_info(A)
    assert isinstance(err.value, CloudUnavailable) and isinstance(err.value, TrustError)


# ------------------------------------------------------------------------------------------------ TUF: attacks


def test_timestamp_signed_with_a_wrong_key_is_refused(tmp_path: Path, repo, server):
    repo.add_target(A, DATA_A)
    trust = agent(tmp_path, repo, server)
    trust.target_info(A)
    server.serve("timestamp.json", resigned((repo.metadata_dir / "timestamp.json").read_bytes(), bump=5))
    with pytest.raises(UntrustedMetadata, match="not signed by the trusted keys"):
        trust.target_info(A)
    server.reset()
    assert trust.target_info(A).length == len(DATA_A), "the honest repository still works"


def test_targets_signed_with_a_wrong_key_cannot_add_a_target(tmp_path: Path, repo, server):
    repo.add_target(A, DATA_A)
    version = repo.versions["targets"]
    name = f"{version}.targets.json"
    md = Metadata.from_bytes((repo.metadata_dir / name).read_bytes())
    evil = dict(md.signed.targets)
    evil["bundles/evil/v1/rpi4.tar.gz"] = md.signed.targets[A]
    server.serve(name, resigned((repo.metadata_dir / name).read_bytes(), targets=evil))
    trust = agent(tmp_path, repo, server)
    for path in (A, "bundles/evil/v1/rpi4.tar.gz"):
        with pytest.raises(UntrustedMetadata):
            trust.target_info(path)


def test_rollback_to_older_metadata_is_refused(tmp_path: Path, repo, server):
    repo.add_target(A, DATA_A)
    old_timestamp = (repo.metadata_dir / "timestamp.json").read_bytes()  # version 2, names snapshot 2
    trust = agent(tmp_path, repo, server)
    repo.add_target(A, DATA_A + b"patched")  # version 3: a fixed bundle
    new = trust.target_info(A)
    assert new.length == len(DATA_A) + 7

    server.serve("timestamp.json", old_timestamp)  # the attacker replays the older, validly signed state
    with pytest.raises(RollbackAttack, match="older than what this agent already trusts"):
        trust.target_info(A)
    # the agent kept the newer trusted state, also across a restart, and never returned the older target
    cached = Metadata.from_bytes((tmp_path / "agent" / "tuf" / "timestamp.json").read_bytes())
    assert cached.signed.version == 3
    with pytest.raises(RollbackAttack):
        BundleTrust(tmp_path / "agent" / "tuf", server.url).target_info(A)
    server.reset()
    assert trust.target_info(A) == new


def test_mix_and_match_snapshot_and_targets_are_refused(tmp_path: Path, repo, server):
    repo.add_target(A, DATA_A)
    old_snapshot = (repo.metadata_dir / "2.snapshot.json").read_bytes()
    old_targets = (repo.metadata_dir / "2.targets.json").read_bytes()
    repo.add_target(B, DATA_B)
    # an older snapshot under the current name: its hash does not match what timestamp signed (5.5.2)
    server.serve("3.snapshot.json", old_snapshot)
    with pytest.raises(UntrustedMetadata, match="does not match the hash"):
        agent(tmp_path, repo, server, "a1").target_info(B)
    server.reset()
    # an older targets under the current name: version 2 where snapshot says 3 (5.6.4)
    server.serve("3.targets.json", old_targets)
    with pytest.raises(RollbackAttack, match="Expected targets v3, got v2"):
        agent(tmp_path, repo, server, "a2").target_info(B)


def test_expired_timestamp_is_a_freeze_until_the_cloud_refreshes(tmp_path: Path, server):
    # A repository whose clock ran two days ago with a one-day timestamp: what an agent sees when re-signing stops.
    clock = Clock(datetime.now(timezone.utc) - timedelta(days=2))
    repo = TufRepository(tmp_path / "cloud", timestamp_expiry_s=86400, clock=clock)
    repo.add_target(A, DATA_A)
    trust = agent(tmp_path, repo, server)
    with pytest.raises(FrozenRepository, match="timestamp.json is expired"):
        trust.target_info(A)
    clock.now = datetime.now(timezone.utc)
    assert repo.refresh_timestamp() is True
    assert trust.target_info(A).length == len(DATA_A)


def test_timestamp_that_expires_while_served_freezes_the_agent(tmp_path: Path, server):
    offset = {"s": 0}
    repo = TufRepository(tmp_path / "cloud", timestamp_expiry_s=2,
                         clock=lambda: datetime.now(timezone.utc) + timedelta(seconds=offset["s"]))
    repo.add_target(A, DATA_A)  # expires 1-2 s from now (TUF expiry has whole seconds)
    trust = agent(tmp_path, repo, server)
    trust.target_info(A)

    def frozen() -> bool:
        try:
            trust.target_info(A)
        except FrozenRepository:
            return True
        return False

    wait_for(frozen, timeout_s=10, what="the agent to refuse the expired timestamp")
    offset["s"] = 3600  # the next re-signing is valid for an hour, so the lookup below cannot race the clock
    assert repo.refresh_timestamp() is True
    assert trust.target_info(A).length == len(DATA_A)


def test_root_resigned_near_expiry_is_followed_by_an_agent_that_pinned_root_1(tmp_path: Path, server):
    clock = Clock(datetime.now(timezone.utc))
    repo = TufRepository(tmp_path / "cloud", root_expiry_s=1000, clock=clock)
    repo.add_target(A, DATA_A)
    trust = agent(tmp_path, repo, server)  # pins root version 1
    trust.target_info(A)
    clock.now += timedelta(seconds=600)  # past half the root's life
    assert repo.refresh_timestamp() is True and repo.versions["root"] == 2
    assert trust.target_info(A).length == len(DATA_A)
    assert (tmp_path / "agent" / "tuf" / "root_history" / "2.root.json").is_file()


# ------------------------------------------------------------------------------------------------ bundle bytes


def test_verify_file_refuses_flipped_byte_and_wrong_length(tmp_path: Path, repo, server):
    repo.add_target(A, DATA_A)
    trust = agent(tmp_path, repo, server)
    info = trust.target_info(A)
    bundle = tmp_path / "a.tar.gz"
    flipped = bytearray(DATA_A)
    flipped[1234] ^= 0x01
    bundle.write_bytes(bytes(flipped))
    with pytest.raises(BundleMismatch, match="does not match the signed hash"):
        trust.verify_file(bundle, info)
    for wrong in (DATA_A[:-1], DATA_A + b"\0", b""):
        bundle.write_bytes(wrong)
        with pytest.raises(BundleMismatch, match="the signed length is 5000"):
            trust.verify_file(bundle, info)
    with pytest.raises(BundleMismatch, match="cannot read"):
        trust.verify_file(tmp_path / "missing.tar.gz", info)


# ------------------------------------------------------------------------------------------------ desired state

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def signer(tmp_path: Path) -> DesiredStateSigner:
    return DesiredStateSigner(tmp_path / "keys")


@pytest.fixture
def verifier(signer: DesiredStateSigner) -> DesiredStateVerifier:
    return DesiredStateVerifier(signer.public_keys())


def state(**changes) -> DesiredState:
    fields = dict(device_id="dev-1", device_class="rpi4", generation=5, issued_at=NOW,
                  expires_at=NOW + timedelta(hours=1),
                  models=[DesiredModel(name="digits", version=1, bundle_target=A)])
    return DesiredState(**{**fields, **changes})


def check(verifier: DesiredStateVerifier, raw, highest: int | None = 4, now: datetime = NOW) -> DesiredState:
    return verifier.verify(raw, device_id="dev-1", device_class="rpi4", highest_generation=highest, now=now)


def test_valid_desired_state_passes_as_bytes_text_or_dict(signer, verifier):
    signed = signer.sign(state())
    for raw in (signed.to_wire(), signed.to_wire().decode(), json.loads(signed.to_wire())):
        assert check(verifier, raw) == state()
    # the signature is over the canonical form, so any JSON layout of the same payload verifies
    relaid = json.dumps(json.loads(signed.to_wire()), indent=3, sort_keys=False).encode()
    assert check(verifier, relaid, highest=None).generation == 5


def test_tampered_payload_is_a_bad_signature(signer, verifier):
    doc = json.loads(signer.sign(state()).to_wire())
    doc["payload"]["generation"] = 99
    with pytest.raises(BadSignature, match="no valid signature"):
        check(verifier, doc)


def test_signed_by_another_key_is_a_bad_signature(tmp_path: Path, verifier):
    other = DesiredStateSigner(tmp_path / "other-keys")
    with pytest.raises(BadSignature, match="unknown key"):
        check(verifier, other.sign(state()).to_wire())


def test_signature_moved_from_another_document_is_refused(signer, verifier):
    doc = json.loads(signer.sign(state(generation=6)).to_wire())
    doc["signatures"] = json.loads(signer.sign(state(generation=5)).to_wire())["signatures"]
    with pytest.raises(BadSignature):
        check(verifier, doc)


@pytest.mark.parametrize("sigs", [[], None, "x", [{"keyid": 1}], [{"keyid": "k", "sig": "zz"}], ["junk"]])
def test_missing_or_malformed_signatures_are_refused(signer, verifier, sigs):
    doc = json.loads(signer.sign(state()).to_wire())
    if sigs is None:
        del doc["signatures"]
    else:
        doc["signatures"] = sigs
    with pytest.raises(BadSignature):
        check(verifier, doc)


def test_valid_signature_with_a_garbled_hex_is_refused(signer, verifier):
    doc = json.loads(signer.sign(state()).to_wire())
    doc["signatures"][0]["sig"] = "not hex"
    with pytest.raises(BadSignature):
        check(verifier, doc)


@pytest.mark.parametrize("generation", [4, 3, 0])
def test_replayed_generation_is_refused(signer, verifier, generation):
    with pytest.raises(Replayed, match=rf"generation {generation} is not newer than the accepted generation 4"):
        check(verifier, signer.sign(state(generation=generation)).to_wire())
    assert check(verifier, signer.sign(state(generation=0)).to_wire(), highest=None).generation == 0


@pytest.mark.parametrize("expires_at", [NOW, NOW - timedelta(seconds=1)])
def test_expired_desired_state_is_refused(signer, verifier, expires_at):
    with pytest.raises(Expired, match="expired at"):
        check(verifier, signer.sign(state(expires_at=expires_at)).to_wire())


def test_other_device_or_class_is_refused(signer, verifier):
    with pytest.raises(WrongDevice, match="'dev-2', not this device 'dev-1'"):
        check(verifier, signer.sign(state(device_id="dev-2")).to_wire())
    with pytest.raises(WrongClass, match="'jetson-nano', but this device is 'rpi4'"):
        check(verifier, signer.sign(state(device_class="jetson-nano")).to_wire())


@pytest.mark.parametrize("raw", [b"\xff\xfe\x00garbage", b"not json", b"[1, 2]", b"null", b'"text"', b"{}",
                                 b'{"payload": [], "signatures": []}', b"x" * 300_000, 42])
def test_garbage_is_a_clear_trust_error(verifier, raw):
    with pytest.raises(TrustError) as err:
        check(verifier, raw)
    assert "\n" not in str(err.value) and str(err.value)


def test_signed_but_malformed_payload_is_a_trust_error(tmp_path: Path, signer, verifier):
    key = load_or_create_signer(tmp_path / "keys" / KEY_FILE)
    for payload in ({**state().model_dump(mode="json"), "generation": -1}, {"kind": "desired_state"}):
        sig = key.sign(canonical_bytes(payload))
        doc = {"kind": "signed_desired_state", "payload": payload,
               "signatures": [{"keyid": sig.keyid, "sig": sig.signature}]}
        with pytest.raises(TrustError, match="signed desired state is malformed: invalid SignedDesiredState"):
            check(verifier, doc)
    doc["payload"] = {"generation": 1.5}
    with pytest.raises(BadSignature, match="no canonical JSON form"):
        check(verifier, doc)


def test_unusable_keys_are_refused():
    with pytest.raises(TrustError, match="no desired-state keys"):
        DesiredStateVerifier([])
    with pytest.raises(TrustError, match="unusable"):
        DesiredStateVerifier([{"keytype": "ed25519"}])
