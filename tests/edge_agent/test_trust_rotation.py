"""Key rotation as the agent sees it: one table of cases, each saying what the agent must do.

TUF rows: the real `TufRepository` rotates (cloud side), the real HTTP server (tests/tuf_server.py) serves it, and
the agent is the real `tuf.ngclient` inside `BundleTrust`; it pinned root 1 at enrollment and looked a target up
once. A row then acts (the cloud rotates, or an attacker serves something) and the agent looks target B up.
Desired-state rows: the real `DesiredStateSigner` rotates and its key lists are published as TUF targets; the agent
reads them back through `BundleTrust.desired_key_documents`, and its `DesiredStateVerifier` checks a document the
way the daemon does (verify; on a bad signature naming a key it does not know, walk the key lists once and verify
again).

`expect` is None where the agent accepts, else the class from edge_agent/errors.py it refuses with. Every row
but the "no rotation yet" baseline exercises something new with issue 7 (rotate_key, export/import_root,
start/finish_rotation, update_keys) and so fails on the code before it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root, TargetFile

from edgefleet.cloud.trust import DesiredStateSigner, TufRepository
from edgefleet.cloud.trust.desired import canonical_bytes, key_dict
from edgefleet.cloud.trust.keys import load_signer
from edgefleet.cloud.trust.rotation import rotate_desired, sign_root_file, take_root_offline
from edgefleet.edge_agent.errors import BadSignature, RollbackAttack, TrustError, UntrustedMetadata
from edgefleet.edge_agent.keyring import KeyRing, load_ring, save_ring
from edgefleet.edge_agent.trust import BundleTrust, DesiredStateVerifier
from edgefleet.protos.messages import (
    DESIRED_KEYS_TARGET,
    DesiredModel,
    DesiredState,
    DesiredStateKeys,
    Signature,
    SignedDesiredState,
    SignedDesiredStateKeys,
)
from tests.tuf_server import TufMetadataServer

A, B = "bundles/digits/v1/rpi4.tar.gz", "bundles/digits/v2/rpi4.tar.gz"
DATA_A, DATA_B = b"A" * 5000, b"B" * 7000
NOW = datetime.now(timezone.utc).replace(microsecond=0)


@pytest.fixture
def server(tmp_path: Path):
    srv = TufMetadataServer(tmp_path / "cloud" / "metadata").start()
    try:
        yield srv
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------------ TUF keys


@dataclass
class Tuf:
    tmp: Path
    repo: TufRepository
    server: TufMetadataServer
    agent: BundleTrust

    def key(self, role: str) -> CryptoSigner:
        """The role's current private key, as a thief of the cloud's key file would hold it."""
        return load_signer(self.repo.keys_dir / f"{role}.pem")

    def file(self, name: str) -> bytes:
        return (self.repo.metadata_dir / name).read_bytes()

    def signed_by(self, name: str) -> set[str]:
        return set(Metadata.from_bytes(self.file(name)).signatures)

    def agent_roots(self) -> list[int]:
        folder = self.tmp / "agent" / "tuf" / "root_history"
        return sorted(int(p.name.split(".")[0]) for p in folder.glob("*.root.json")) if folder.is_dir() else []


def targets_new_key_only(c: Tuf) -> None:
    c.repo.rotate_key("targets")
    c.repo.add_target(B, DATA_B)
    assert c.signed_by(f"{c.repo.versions['targets']}.targets.json") == {c.key("targets").public_key.keyid}


def targets_old_key_only(c: Tuf) -> None:
    old = c.key("targets")
    c.repo.rotate_key("targets")
    c.repo.add_target(B, DATA_B)
    name = f"{c.repo.versions['targets']}.targets.json"
    md = Metadata.from_bytes(c.file(name))
    md.signed.targets[B] = TargetFile.from_data(B, b"evil", ["sha256"])
    md.sign(old)  # what the thief of the old key can still sign
    c.server.serve(name, md.to_bytes())


def targets_both_keys_before_root_2_is_seen(c: Tuf) -> None:
    old = c.key("targets")
    c.repo.add_target(B, DATA_B)
    new_keyid = c.repo.rotate_key("targets")
    # The targets the rotation re-signed first carry both signatures, so an agent that cannot see root 2 yet (here
    # withheld) verifies them with the old key, and one that has root 2 with the new.
    assert c.signed_by(f"{c.repo.versions['targets']}.targets.json") == {old.public_key.keyid, new_keyid}
    c.server.hide("2.root.json")


def timestamp_revoked_key_signs_a_newer_one(c: Tuf) -> None:
    old = c.key("timestamp")
    c.repo.rotate_key("timestamp")
    c.repo.add_target(B, DATA_B)
    c.agent.target_info(B)  # the agent follows to root 2, which no longer lists the old key
    md = Metadata.from_bytes(c.file("timestamp.json"))
    md.signed.version += 10
    md.sign(old)
    c.server.serve("timestamp.json", md.to_bytes())


def root_2_without_root_1s_signature(c: Tuf) -> None:
    new = CryptoSigner.generate_ed25519()
    md = Metadata[Root].from_bytes(c.repo.export_root(root_keys=[new.public_key]))
    md.sign(new)  # its own threshold only
    c.server.serve("2.root.json", md.to_bytes())


def root_2_without_its_own_signature(c: Tuf) -> None:
    new = CryptoSigner.generate_ed25519()
    md = Metadata[Root].from_bytes(c.repo.export_root(root_keys=[new.public_key]))
    md.sign(c.key("root"))  # root 1's threshold only: the new root key never signed
    c.server.serve("2.root.json", md.to_bytes())


def root_version_skipped(c: Tuf) -> None:
    c.repo.rotate_key("timestamp")
    c.repo.rotate_key("timestamp")
    c.repo.add_target(B, DATA_B)
    c.server.hide("2.root.json")  # 404: the agent stays on root 1, whose timestamp key signs nothing any more


def root_3_served_as_root_2(c: Tuf) -> None:
    c.repo.rotate_key("timestamp")
    c.repo.rotate_key("timestamp")
    c.repo.add_target(B, DATA_B)
    c.server.serve("2.root.json", c.file("3.root.json"))


def agent_down_through_four_rotations(c: Tuf) -> None:
    for role in ("root", "targets", "snapshot", "timestamp"):
        c.repo.rotate_key(role)
    c.repo.add_target(B, DATA_B)
    assert c.repo.versions["root"] == 5
    c.agent = BundleTrust(c.tmp / "agent" / "tuf", c.server.url)  # restarted: from its cached trusted state


def older_root_served_again(c: Tuf) -> None:
    c.repo.rotate_key("timestamp")
    c.repo.rotate_key("timestamp")
    c.repo.add_target(B, DATA_B)
    c.agent.target_info(B)
    assert c.agent_roots() == [1, 2, 3]
    c.server.serve("4.root.json", c.file("2.root.json"))


def rotated_out_root_key_signs_root_3(c: Tuf) -> None:
    old = c.key("root")
    c.repo.rotate_key("root")
    c.repo.add_target(B, DATA_B)
    c.agent.target_info(B)  # root 2, signed by the old root key and the new one
    md = Metadata[Root].from_bytes(c.file("2.root.json"))
    md.signed.version = 3
    thief = CryptoSigner.generate_ed25519()
    for keyid in list(md.signed.roles["timestamp"].keyids):
        md.signed.revoke_key(keyid, "timestamp")
    md.signed.add_key(thief.public_key, "timestamp")
    md.sign(old)
    c.server.serve("3.root.json", md.to_bytes())


def offline_root_signed_elsewhere(c: Tuf) -> None:
    key_file = c.tmp / "usb" / "root.pem"
    key_file.parent.mkdir()
    take_root_offline(c.repo, key_file)
    cloud = TufRepository(c.repo.root_dir, offline_root=True)
    exported = c.tmp / "next-root.json"
    exported.write_bytes(cloud.export_root(rotate=["targets", "snapshot"]))
    sign_root_file(exported, [key_file])  # on the machine that keeps the root key
    assert cloud.import_root(exported.read_bytes()) == 2
    cloud.add_target(B, DATA_B)


@dataclass(frozen=True)
class TufCase:
    name: str
    act: Callable[[Tuf], None]
    expect: type[TrustError] | None
    roots_after: list[int] | None = None  # the root versions the agent has verified (root_history/) afterwards


TUF_CASES = [
    TufCase("targets key rotated, new key only: accepted", targets_new_key_only, None, [1, 2]),
    TufCase("targets key rotated, old key only (a thief of it): refused", targets_old_key_only, UntrustedMetadata,
            [1, 2]),
    TufCase("both keys, mid rotation, root 2 withheld: accepted on root 1", targets_both_keys_before_root_2_is_seen,
            None, [1]),
    TufCase("revoked timestamp key signs a newer timestamp: refused", timestamp_revoked_key_signs_a_newer_one,
            UntrustedMetadata, [1, 2]),
    TufCase("root 2 lacks root 1's threshold: refused, stays on root 1", root_2_without_root_1s_signature,
            UntrustedMetadata, [1]),
    TufCase("root 2 lacks its own threshold: refused, stays on root 1", root_2_without_its_own_signature,
            UntrustedMetadata, [1]),
    TufCase("rotation skipped a root version (2 missing): refused", root_version_skipped, UntrustedMetadata, [1]),
    TufCase("root 3 served as root 2 (a skipped version): refused", root_3_served_as_root_2, RollbackAttack, [1]),
    TufCase("agent down through four rotations: walks root 2..5, accepted", agent_down_through_four_rotations, None,
            [1, 2, 3, 4, 5]),
    TufCase("rollback of root (root 2 served as root 4): refused", older_root_served_again, RollbackAttack,
            [1, 2, 3]),
    TufCase("rotated-out root key signs a root 3: refused", rotated_out_root_key_signs_root_3, UntrustedMetadata,
            [1, 2]),
    TufCase("offline root: exported, signed elsewhere, imported: accepted", offline_root_signed_elsewhere, None,
            [1, 2]),
]


@pytest.mark.parametrize("case", TUF_CASES, ids=[c.name for c in TUF_CASES])
def test_tuf_key_rotation(tmp_path: Path, server: TufMetadataServer, case: TufCase):
    repo = TufRepository(tmp_path / "cloud")
    repo.add_target(A, DATA_A)
    ctx = Tuf(tmp_path, repo, server, BundleTrust(tmp_path / "agent" / "tuf", server.url, trusted_root=repo.root()))
    assert ctx.agent.target_info(A).length == len(DATA_A)  # enrolled on root 1 and working
    case.act(ctx)
    if case.expect is None:
        assert ctx.agent.target_info(B).length == len(DATA_B)
    else:
        with pytest.raises(case.expect):
            ctx.agent.target_info(B)
    if case.roots_after is not None:
        assert ctx.agent_roots() == case.roots_after
    server.reset()
    # Whatever was served, an agent pinned on root 1 follows the honest repository to its newest root.
    fresh = BundleTrust(tmp_path / "fresh" / "tuf", server.url, trusted_root=(tmp_path / "cloud" / "metadata" /
                                                                               "1.root.json").read_bytes())
    assert fresh.target_info(A).length == len(DATA_A)


# ------------------------------------------------------------------------------------------------ desired-state key


@dataclass
class Desired:
    tmp: Path
    repo: TufRepository
    signer: DesiredStateSigner
    agent: BundleTrust
    verifier: DesiredStateVerifier
    offer: Callable[[], list[dict]] | None = None  # the key lists the agent is given; default: through TUF
    generation: int = 0
    old: CryptoSigner = field(init=False)

    def __post_init__(self) -> None:
        self.old = load_signer(self.signer.key_path)

    def doc(self, *keys: CryptoSigner) -> bytes:
        """A desired state for dev-1 signed by exactly `keys` (the cloud's signer when none is given)."""
        self.generation += 1
        state = DesiredState(device_id="dev-1", device_class="rpi4", generation=self.generation, issued_at=NOW,
                             expires_at=NOW + timedelta(hours=1),
                             models=[DesiredModel(name="digits", version=2, bundle_target=B)])
        if not keys:
            return self.signer.sign(state).to_wire()
        data = canonical_bytes(state.model_dump(mode="json"))
        sigs = [Signature(keyid=s.keyid, sig=s.signature) for s in (k.sign(data) for k in keys)]
        return SignedDesiredState(payload=state, signatures=sigs).to_wire()

    def learn(self) -> bool:
        return self.verifier.update_keys(self.offer() if self.offer else self.agent.desired_key_documents())

    def accept(self, raw: bytes) -> DesiredState:
        """What the daemon does (`Agent._verify_desired`): on a bad signature by a key it does not know, look at the
        cloud's key lists once and try again; a failed look leaves the first refusal standing."""
        def verify() -> DesiredState:
            return self.verifier.verify(raw, device_id="dev-1", device_class="rpi4", highest_generation=None, now=NOW)

        try:
            return verify()
        except BadSignature:
            if not self.verifier.names_unknown_key(raw):
                raise
            try:
                changed = self.learn()
            except TrustError:
                changed = False
            if not changed:
                raise
        return verify()

    def signing_key(self) -> CryptoSigner:
        return load_signer(self.signer.key_path)

    def next_key(self) -> CryptoSigner:
        return load_signer(self.signer.next_key_path)

    def forge_list(self, version: int, keys: list[CryptoSigner], signed_by: list[CryptoSigner]) -> None:
        """A key list published through TUF (a thief of the TUF targets key can do that) but signed as given."""
        payload = DesiredStateKeys(version=version, issued_at=NOW, keys=[key_dict(k) for k in keys])
        data = canonical_bytes(payload.to_dict())
        doc = SignedDesiredStateKeys(payload=payload, signatures=[Signature(keyid=s.keyid, sig=s.signature)
                                                                  for s in (k.sign(data) for k in signed_by)])
        self.repo.add_target(DESIRED_KEYS_TARGET.format(version=version), doc.to_wire(), custom=doc.to_dict())


def d_no_rotation(c: Desired) -> Callable[[], object]:
    return lambda: c.accept(c.doc())


def d_old_key_only_rotation_unseen(c: Desired) -> Callable[[], object]:
    rotate_desired(c.signer, c.repo, finish=False)
    return lambda: c.accept(c.doc(c.old))


def d_both_keys(c: Desired) -> Callable[[], object]:
    rotate_desired(c.signer, c.repo, finish=False)
    assert c.learn() and len(c.verifier.ring.keys) == 2
    return lambda: c.accept(c.doc())  # the cloud signs with both during the rotation


def d_new_key_only_announced(c: Desired) -> Callable[[], object]:
    rotate_desired(c.signer, c.repo, finish=False)
    c.learn()
    return lambda: c.accept(c.doc(c.next_key()))


def d_new_key_only_announcement_missed(c: Desired) -> Callable[[], object]:
    rotate_desired(c.signer, c.repo, finish=False)
    rotate_desired(c.signer, c.repo, finish=True)
    return lambda: c.accept(c.doc())  # unknown key: the agent looks at the key lists, walks v1 and v2, accepts


def d_unlisted_key(c: Desired) -> Callable[[], object]:
    return lambda: c.accept(c.doc(CryptoSigner.generate_ed25519()))


def d_revoked_key(c: Desired) -> Callable[[], object]:
    rotate_desired(c.signer, c.repo, finish=False)
    rotate_desired(c.signer, c.repo, finish=True)
    c.accept(c.doc())  # signed by the new key alone: the agent learns the rotation finished
    assert c.old.public_key.keyid in c.verifier.ring.revoked
    return lambda: c.accept(c.doc(c.old))


def d_list_not_signed_by_the_current_key(c: Desired) -> Callable[[], object]:
    thief = CryptoSigner.generate_ed25519()
    c.forge_list(1, [thief], [thief])
    return lambda: c.accept(c.doc(thief))


def d_list_adds_a_key_that_did_not_sign(c: Desired) -> Callable[[], object]:
    extra = CryptoSigner.generate_ed25519()
    c.forge_list(1, [c.old, extra], [c.old])
    return lambda: c.accept(c.doc(extra))


def d_skipped_version(c: Desired) -> Callable[[], object]:
    c.signer.start_rotation()
    c.signer.finish_rotation()
    v2 = c.signer.documents()[1]
    c.repo.add_target(DESIRED_KEYS_TARGET.format(version=2), v2.to_wire(), custom=v2.to_dict())  # v1 never published
    return lambda: c.accept(c.doc())


def d_down_through_two_rotations(c: Desired) -> Callable[[], object]:
    middle = None
    for _ in range(2):
        rotate_desired(c.signer, c.repo, finish=False)
        middle = middle or c.next_key()
        rotate_desired(c.signer, c.repo, finish=True)
    assert c.signer.documents()[-1].payload.version == 4

    def attempt() -> object:
        c.accept(c.doc())
        assert c.verifier.ring.version == 4 and len(c.verifier.ring.keys) == 1
        for stale in (c.old, middle):  # both earlier keys are revoked now
            with pytest.raises(BadSignature, match="revoked"):
                c.accept(c.doc(stale))
        return None
    return attempt


def d_rollback_of_the_key_lists(c: Desired) -> Callable[[], object]:
    rotate_desired(c.signer, c.repo, finish=False)
    rotate_desired(c.signer, c.repo, finish=True)
    assert c.learn() and c.verifier.ring.version == 2
    v1 = c.signer.documents()[0].to_dict()  # {old, new}: would trust the revoked key again
    c.offer = lambda: [v1]

    def attempt() -> object:
        try:
            return c.learn()
        finally:
            with pytest.raises(BadSignature, match="revoked"):
                c.accept(c.doc(c.old))
    return attempt


@dataclass(frozen=True)
class DesiredCase:
    name: str
    act: Callable[[Desired], Callable[[], object]]
    expect: type[TrustError] | None


DESIRED_CASES = [
    DesiredCase("no rotation yet, old key: accepted (baseline)", d_no_rotation, None),
    DesiredCase("old key only, rotation started, lists not read: accepted", d_old_key_only_rotation_unseen, None),
    DesiredCase("both keys, new key learned: accepted", d_both_keys, None),
    DesiredCase("new key only, announced and learned: accepted", d_new_key_only_announced, None),
    DesiredCase("new key only, announcement missed: learned then accepted", d_new_key_only_announcement_missed, None),
    DesiredCase("a key no list names: refused", d_unlisted_key, BadSignature),
    DesiredCase("revoked key after the rotation finished: refused", d_revoked_key, BadSignature),
    DesiredCase("list not signed by the current key (threshold not met): refused",
                d_list_not_signed_by_the_current_key, BadSignature),
    DesiredCase("list adds a key that did not sign it: refused", d_list_adds_a_key_that_did_not_sign, BadSignature),
    DesiredCase("a rotation that skipped a version (v1 missing): refused", d_skipped_version, BadSignature),
    DesiredCase("agent down through two rotations: walks v1..v4, accepted", d_down_through_two_rotations, None),
    DesiredCase("rollback of the key lists (v1 offered after v2): refused", d_rollback_of_the_key_lists,
                RollbackAttack),
]


@pytest.mark.parametrize("case", DESIRED_CASES, ids=[c.name for c in DESIRED_CASES])
def test_desired_state_key_rotation(tmp_path: Path, server: TufMetadataServer, case: DesiredCase):
    repo = TufRepository(tmp_path / "cloud")
    signer = DesiredStateSigner(tmp_path / "keys")
    # enrolled before any rotation: the enrollment's keys, and the TUF root of the time
    ctx = Desired(tmp_path, repo, signer, BundleTrust(tmp_path / "agent" / "tuf", server.url,
                                                      trusted_root=repo.root()),
                  DesiredStateVerifier(signer.public_keys()))
    ring_before = ctx.verifier.ring
    attempt = case.act(ctx)
    if case.expect is None:
        attempt()
    else:
        before = ctx.verifier.ring.trust
        with pytest.raises(case.expect):
            attempt()
        assert ctx.verifier.ring.trust == before, "a refusal changes no trusted key"
    assert ring_before.enrolled == ctx.verifier.ring.enrolled


# ------------------------------------------------------------------------------------------------ the ring, kept


def test_the_ring_survives_a_restart_and_a_new_enrollment_starts_over(tmp_path: Path):
    signer = DesiredStateSigner(tmp_path / "keys")
    enrolled = signer.public_keys()
    old = load_signer(signer.key_path)
    signer.start_rotation()
    signer.finish_rotation()
    verifier = DesiredStateVerifier(enrolled)
    assert verifier.update_keys([d.to_dict() for d in signer.documents()])
    path = tmp_path / "agent" / "desired_keys.json"
    path.parent.mkdir()
    save_ring(path, verifier.ring)
    assert oct(path.stat().st_mode & 0o777) == "0o600"

    restarted = load_ring(path, enrolled)  # the same enrollment: the saved ring, old key revoked
    assert restarted == verifier.ring and old.public_key.keyid in restarted.revoked
    again = load_ring(path, signer.public_keys())  # enrolled again: what the cloud hands out now, not yet placed
    assert again.version is None and set(again.keys) == {signer.keyid} and not again.revoked
    assert DesiredStateVerifier(ring=again).update_keys([d.to_dict() for d in signer.documents()])  # placed at v2
    path.write_text("{not json")
    assert load_ring(path, enrolled) == KeyRing.from_enrollment(enrolled)


def test_an_enrollment_during_a_rotation_is_placed_in_the_chain(tmp_path: Path):
    signer = DesiredStateSigner(tmp_path / "keys")
    signer.start_rotation()
    verifier = DesiredStateVerifier(signer.public_keys())  # both keys, handed out mid rotation
    assert len(verifier.ring.keys) == 2
    signer.finish_rotation()
    assert verifier.update_keys([d.to_dict() for d in signer.documents()])
    assert verifier.ring.version == 2 and set(verifier.ring.keys) == {signer.keyid}


def test_a_garbled_key_list_is_one_clear_line(tmp_path: Path):
    verifier = DesiredStateVerifier(DesiredStateSigner(tmp_path / "keys").public_keys())
    for docs in ([{"kind": "nonsense"}], [json.loads('{"payload": 1}')]):
        with pytest.raises(TrustError) as err:
            verifier.update_keys(docs)
        assert "\n" not in str(err.value)
    assert verifier.ring.version is None
