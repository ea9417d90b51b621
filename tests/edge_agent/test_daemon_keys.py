"""edge_agent/daemon.py and a desired-state key rotation: when the agent looks at the cloud's key lists, what it
keeps in desired_keys.json, and that a revoked key stays refused across a restart.

The loop runs over the in-memory seams of test_daemon.py; the key lists come from the cloud's real
`DesiredStateSigner` through a `KeyDocumentSource` beside the in-memory TUF repository (the TUF path itself is
covered by tests/edge_agent/test_trust_rotation.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner

from edgefleet.cloud.trust import DesiredStateSigner
from edgefleet.cloud.trust.desired import canonical_bytes
from edgefleet.cloud.trust.keys import load_signer
from edgefleet.edge_agent.daemon import DESIRED_KEYS_FILE, UNKNOWN_KEY_RECHECK_S, Agent
from edgefleet.edge_agent.errors import MetadataUnavailable
from edgefleet.protos.messages import Signature, SignedDesiredState
from tests.edge_agent import agent_testkit as kit
from tests.edge_agent.fakes import ManualClock, MemoryCloud, MemoryLink, enrollment


@dataclass
class KeyedRepo(kit.MemoryRepo):
    """The in-memory TUF repository, also carrying the cloud's desired-state key lists."""

    signer: DesiredStateSigner | None = None
    looks: int = 0
    down: bool = False

    def desired_key_documents(self) -> list[dict]:
        self.looks += 1
        if self.down:
            raise MetadataUnavailable("TUF metadata could not be fetched (test): retry later")
        assert self.signer is not None
        return [d.to_dict() for d in self.signer.documents()]


@dataclass
class Env:
    tmp: Path
    signer: DesiredStateSigner
    repo: KeyedRepo
    cloud: MemoryCloud
    clock: ManualClock
    link: MemoryLink = field(default_factory=MemoryLink)
    agent: Agent | None = None
    generation: int = 0

    def start(self) -> Agent:
        self.link = MemoryLink()
        self.agent = Agent(kit.make_config(self.tmp), link_factory=self.link.attach, client=self.cloud,
                           clock=self.clock, trust_factory=lambda _enrollment: self.repo)
        assert self.agent.connect()
        self.pump()
        return self.agent

    def pump(self) -> None:
        assert self.agent is not None
        for _ in range(50):
            assert self.agent.run_once(0)
            if self.agent.events.empty():
                return
        raise AssertionError("the loop keeps finding events")

    def deliver(self, *keys: CryptoSigner) -> int:
        """A new generation signed by the cloud's signer, or by exactly `keys`; delivered and handled."""
        self.generation += 1
        state = kit.desired([], generation=self.generation)
        if keys:
            data = canonical_bytes(state.model_dump(mode="json"))
            raw = SignedDesiredState(payload=state, signatures=[
                Signature(keyid=s.keyid, sig=s.signature) for s in (k.sign(data) for k in keys)]).to_wire()
        else:
            raw = self.signer.sign(state).to_wire()
        self.link.deliver(raw)
        self.pump()
        return self.generation

    @property
    def accepted(self) -> int | None:
        assert self.agent is not None
        return self.agent.store.state.highest_generation

    def saved_ring(self) -> dict:
        return json.loads((self.tmp / "data" / DESIRED_KEYS_FILE).read_bytes())


@pytest.fixture
def env(tmp_path: Path):
    signer = DesiredStateSigner(tmp_path / "cloud-keys")
    repo = KeyedRepo(signer=signer)
    e = Env(tmp_path, signer, repo, MemoryCloud(enrollment(signer.public_keys()), repo), ManualClock(kit.T0))
    yield e
    if e.agent is not None:
        e.agent.shutdown()


def test_a_rotation_is_followed_and_the_revoked_key_stays_refused_after_a_restart(env):
    old = load_signer(env.signer.key_path)
    agent = env.start()
    looks = env.repo.looks

    env.signer.start_rotation()
    both = env.deliver()  # signed by both: the old key verifies, nothing to look up
    assert env.accepted == both
    assert env.repo.looks == looks

    env.signer.finish_rotation()
    new_only = env.deliver()  # a key the agent never saw: it looks at the lists, walks v1 and v2, accepts
    assert env.accepted == new_only and env.repo.looks == looks + 1
    ring = env.saved_ring()
    assert ring["version"] == 2 and [k["keyid"] for k in ring["keys"]] == [env.signer.keyid]
    assert ring["revoked"] == [old.public_key.keyid]

    env.deliver(old)  # the revoked key (say, stolen) signs a newer generation: refused, reported
    assert env.accepted == new_only and agent.counters.get("refused_bad_signature") == 1
    assert "revoked" in env.link.reported[-1].last_error

    agent.shutdown()
    env.agent = None
    env.start()  # a restart: the ring comes from desired_keys.json, not from the enrollment's old key
    env.deliver(old)
    assert env.accepted == new_only
    assert env.deliver() == env.accepted


def test_a_key_the_agent_trusts_but_no_longer_sees_signing_is_looked_up(env):
    """The agent learned both keys mid rotation; when documents come signed by the new key alone, it looks at the
    lists (the old key may be revoked) without waiting for a refusal."""
    old = load_signer(env.signer.key_path)
    env.signer.start_rotation()
    env.cloud.answer = enrollment(env.signer.public_keys())  # enrolled mid rotation: both keys
    env.start()
    looks = env.repo.looks
    env.signer.finish_rotation()
    env.deliver()
    assert env.repo.looks == looks + 1
    assert env.saved_ring()["revoked"] == [old.public_key.keyid]
    before = env.accepted
    env.deliver(old)
    assert env.accepted == before


def test_unknown_keys_are_looked_up_at_most_once_a_minute_and_a_failed_look_refuses(env):
    agent = env.start()
    env.repo.down = True
    env.signer.start_rotation()
    env.signer.finish_rotation()
    looks = env.repo.looks
    env.deliver()
    env.deliver()  # within the minute: no second look
    assert env.repo.looks == looks + 1 and env.accepted is None
    assert agent.counters.get("desired_keys_cloud_unavailable") == 1
    assert agent.counters.get("refused_bad_signature") == 2
    env.repo.down = False
    env.clock.advance(UNKNOWN_KEY_RECHECK_S)
    assert env.deliver() == env.accepted


def test_an_unrelated_key_is_not_looked_up(env):
    agent = env.start()
    looks = env.repo.looks
    env.deliver(CryptoSigner.generate_ed25519())  # names an unknown key: one look, nothing learned, refused
    env.clock.advance(UNKNOWN_KEY_RECHECK_S)
    for garbage in (b"{}", b"not json"):
        env.link.deliver(garbage)
        env.pump()
    assert env.repo.looks == looks + 1 and env.accepted is None
    assert agent.counters.get("refused_bad_signature") == 2
