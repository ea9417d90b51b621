"""edge_agent/daemon.py: the loop over in-memory seams (link, cloud, clock); every other part of the agent is real.

A test drives the loop one turn at a time with `Agent.run_once(0)` and moves the manual clock instead of sleeping;
one test runs the real `Agent.run()` on a thread. Desired states are signed by the cloud's real signer and checked
by the agent's real verifier; bundles are real (agent_testkit) and smoke-tested with ONNX Runtime.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from edgefleet.cloud.trust import DesiredStateSigner
from edgefleet.edge_agent.clock import SystemClock
from edgefleet.edge_agent.cloud_client import CloudClient
from edgefleet.edge_agent.config import LinkConfig, MqttConfig, ReconcileConfig
from edgefleet.edge_agent.daemon import Agent
from edgefleet.edge_agent.link_mqtt import MqttLink
from tests.edge_agent import agent_testkit as kit
from tests.edge_agent.fakes import ManualClock, MemoryCloud, MemoryLink, enrollment
from tests.harness import wait_for

GARBAGE = [b"\x00\xff garbage", b"[]", b'{"kind":"signed_desired_state"}', b"{" * 10000]


@dataclass
class Env:
    agent: Agent
    link: MemoryLink
    cloud: MemoryCloud
    clock: ManualClock
    signer: DesiredStateSigner
    repo: kit.MemoryRepo
    tmp: Path

    def doc(self, *versions: int, generation: int, signer: DesiredStateSigner | None = None) -> bytes:
        state = kit.desired([("digits", v) for v in versions], generation=generation)
        return (signer or self.signer).sign(state).to_wire()

    def pump(self) -> None:
        pump(self.agent)

    def infer(self) -> tuple[list[float], int]:
        out, prov = self.agent.service.run("digits", {"x": np.asarray([[1.0, 2.0, 3.0]], dtype=np.float32)})
        return out["y"][0].tolist(), prov.model_version

    def errors(self) -> list[str | None]:
        return [r.last_error for r in self.link.reported + self.cloud.reported]


def pump(agent: Agent) -> None:
    """Turn the loop until no event is left (at least once)."""
    for _ in range(50):
        assert agent.run_once(0)
        if agent.events.empty():
            return
    raise AssertionError("the loop keeps finding events")


def make_env(tmp_path: Path, *, memory_link: MemoryLink | None = None, **config_changes) -> Env:
    repo = kit.MemoryRepo()
    for version in (1, 2):
        repo.publish(kit.target_path("digits", version), kit.make_bundle(version=version))
    signer = DesiredStateSigner(tmp_path / "keys")
    cloud = MemoryCloud(enrollment(signer.public_keys()), repo)
    clock = ManualClock(kit.T0)
    link = memory_link or MemoryLink()
    agent = Agent(kit.make_config(tmp_path, **config_changes), link_factory=link.attach, client=cloud, clock=clock,
                  trust_factory=lambda _enrollment: repo)
    return Env(agent, link, cloud, clock, signer, repo, tmp_path)


@pytest.fixture
def env(tmp_path):
    e = make_env(tmp_path)
    assert e.agent.connect()
    yield e
    e.agent.shutdown()


def refusals(agent: Agent) -> int:
    return sum(n for k, n in agent.counters.items() if k.startswith("refused_"))


def test_desired_state_from_the_link_is_verified_accepted_and_converged(env):
    env.pump()  # the fetches over HTTP at start and on the link's connect find nothing yet
    assert env.cloud.desired_fetches == 2 and env.cloud.token == "device-token"
    env.link.deliver(env.doc(1, generation=1))
    env.pump()
    assert env.agent.store.state.highest_generation == 1
    assert env.agent.installer.active_version("digits") == 1
    assert env.infer() == ([3.0, 5.0, 7.0], 1)  # y = 2x + 1: the bundle's model serves
    last = env.link.reported[-1]
    assert [(m.name, m.state, m.active_version) for m in last.models] == [("digits", "active", 1)]
    assert last.generation == 1 and last.last_error is None and last.reported_at == kit.T0
    assert env.cloud.reported == []  # the link acknowledged everything: no HTTP fallback
    assert env.link.timeouts and set(env.link.timeouts) == {env.agent.config.link.ack_timeout_s}


def test_the_same_generation_twice_is_not_an_error(env):
    doc = env.doc(1, generation=1)
    env.cloud.desired = doc  # HTTP serves it ...
    env.link.deliver(doc)  # ... and the broker's retained copy arrives too
    env.pump()
    env.link.connect()  # a reconnect: the HTTP fetch brings the same document once more
    env.link.deliver(doc)
    env.pump()
    assert env.cloud.desired_fetches == 3  # start, connect, reconnect
    assert env.agent.store.state.highest_generation == 1 and env.agent.installer.active_version("digits") == 1
    assert refusals(env.agent) == 0 and env.agent.last_error is None
    assert env.errors() and set(env.errors()) == {None}


def test_an_older_generation_is_refused_and_the_refusal_is_reported(env):
    old = env.doc(1, generation=1)
    env.link.deliver(old)
    env.pump()
    env.link.deliver(env.doc(2, generation=2))
    env.pump()
    assert env.agent.installer.active_version("digits") == 2
    env.link.deliver(old)  # a replay: validly signed, but older
    env.pump()
    assert env.agent.counters == {"refused_replayed": 1}
    assert env.agent.installer.active_version("digits") == 2 and env.agent.store.state.highest_generation == 2
    refused = env.link.reported[-1]
    assert "refused desired state from memory" in refused.last_error
    assert "generation 1 is not newer than the accepted generation 2" in refused.last_error
    # A newer document is news again: accepted, and a report says the error is gone, though no model changed.
    env.link.deliver(env.doc(2, generation=3))
    env.pump()
    assert env.agent.installer.active_version("digits") == 2
    assert env.link.reported[-1].last_error is None and env.link.reported[-1].generation == 3


def test_a_retained_copy_older_than_the_http_fetch_is_refused_without_an_alarm(env):
    """The broker's retained copy can lag the database (the cloud commits, then publishes): a device that connects
    in between fetches generation 2 over HTTP and then gets generation 1 on subscribe. Refused and counted, but no
    last_error; the same document published live is still an alarm."""
    env.link.deliver(env.doc(1, generation=1))
    env.pump()
    env.link.deliver(env.doc(2, generation=2))
    env.pump()
    reports = len(env.link.reported)
    lagging = env.doc(1, generation=1)
    env.link.deliver(lagging, retained=True)
    env.pump()
    assert env.agent.counters == {"refused_stale_retained": 1}
    assert env.agent.last_error is None and all(r.last_error is None for r in env.link.reported[reports:])
    assert env.agent.installer.active_version("digits") == 2 and env.agent.store.state.highest_generation == 2
    env.link.deliver(lagging)  # live: someone published an old document to an established subscription
    env.pump()
    assert env.agent.counters["refused_replayed"] == 1
    assert "not newer than the accepted generation 2" in env.link.reported[-1].last_error
    # A retained document that is not stale but bad (forged, foreign, garbage) is an alarm wherever it came from.
    env.link.deliver(b"\x00 garbage", retained=True)
    env.pump()
    assert "refused desired state" in env.link.reported[-1].last_error and "not newer" not in \
        env.link.reported[-1].last_error


def test_forged_and_garbage_payloads_are_counted_and_the_loop_goes_on(env):
    env.pump()
    forger = DesiredStateSigner(env.tmp / "forger-keys")
    for raw in [*GARBAGE, env.doc(2, generation=9, signer=forger)]:
        env.link.deliver(raw)
    env.pump()
    assert refusals(env.agent) == len(GARBAGE) + 1
    assert env.agent.counters.get("refused_bad_signature", 0) >= 1 and "loop_errors" not in env.agent.counters
    assert env.agent.store.state.highest_generation is None  # nothing forged was accepted, not even its generation
    assert "no valid signature" in env.link.reported[-1].last_error
    env.link.deliver(env.doc(1, generation=1))
    env.pump()
    assert env.agent.installer.active_version("digits") == 1 and env.agent.store.state.highest_generation == 1


def test_expiry_is_judged_by_the_agent_clock(env):
    env.pump()
    env.clock.advance(timedelta(days=2).total_seconds())  # the document expires one day after kit.T0
    env.link.deliver(env.doc(1, generation=1))
    env.pump()
    assert env.agent.counters == {"refused_expired": 1} and env.agent.installer.active_version("digits") is None


def test_link_down_reports_and_telemetry_go_over_http(tmp_path):
    env = make_env(tmp_path, memory_link=MemoryLink(up=False))
    env.cloud.desired = env.doc(1, generation=1)
    assert env.agent.connect()
    try:
        env.pump()  # the start fetch over HTTP brings the document
        assert env.agent.installer.active_version("digits") == 1
        assert env.cloud.reported[-1].models[0].state == "active" and env.link.reported == []
        env.agent.telemetry.record("digits", 1, 2.5, env.clock.now())
        env.clock.advance(env.agent.config.telemetry.window_s)
        env.pump()
        assert [b.seq for b in env.cloud.telemetry] == [0] and env.cloud.telemetry[0].windows[0].count == 1
        assert env.link.telemetry == [] and len(env.agent.telemetry.outbox) == 0
    finally:
        env.agent.shutdown()


def test_link_up_but_no_acknowledgement_falls_back_to_http(tmp_path):
    env = make_env(tmp_path, memory_link=MemoryLink(ack=False), link=LinkConfig(ack_timeout_s=0.25))
    env.cloud.desired = env.doc(1, generation=1)
    assert env.agent.connect()
    try:
        env.pump()
        env.agent.telemetry.record("digits", 1, 2.5, env.clock.now())
        env.clock.advance(env.agent.config.telemetry.window_s)
        env.pump()
        assert env.agent.installer.active_version("digits") == 1
        assert env.link.reported == [] and env.link.telemetry == []
        assert {m.kind for m in env.link.unacked} == {"reported_state", "telemetry"}  # offered to the link first
        assert set(env.link.timeouts) == {0.25}  # link.ack_timeout_s from the config
        assert env.cloud.reported[-1].models[0].state == "active" and [b.seq for b in env.cloud.telemetry] == [0]
        assert len(env.agent.telemetry.outbox) == 0
    finally:
        env.agent.shutdown()


def test_both_down_telemetry_waits_in_the_outbox_and_goes_in_order_once_a_link_is_back(tmp_path):
    env = make_env(tmp_path, memory_link=MemoryLink(up=False))
    assert env.agent.connect()
    try:
        env.cloud.reachable = False
        window_s = env.agent.config.telemetry.window_s
        for latency_ms in (1.0, 2.0, 3.0):  # three windows, three batches
            env.agent.telemetry.record("digits", 1, latency_ms, env.clock.now())
            env.clock.advance(window_s)
            env.pump()
        assert len(env.agent.telemetry.outbox) == 3 and env.cloud.failed_posts >= 3
        assert env.cloud.telemetry == [] and env.link.telemetry == []
        env.link.connect()
        env.pump()
        assert [b.seq for b in env.link.telemetry] == [0, 1, 2]
        assert [b.windows[0].p50_ms for b in env.link.telemetry] == [1.0, 2.0, 3.0]
        assert len(env.agent.telemetry.outbox) == 0 and env.cloud.telemetry == []
    finally:
        env.agent.shutdown()


def test_a_batch_that_fails_holds_back_the_newer_ones(tmp_path):
    env = make_env(tmp_path, memory_link=MemoryLink(up=False))
    assert env.agent.connect()
    try:
        env.cloud.reachable = False
        for latency_ms in (1.0, 2.0):
            env.agent.telemetry.record("digits", 1, latency_ms, env.clock.now())
            env.clock.advance(env.agent.config.telemetry.window_s)
            env.pump()
        env.cloud.reachable = True
        env.cloud.fail_telemetry = 1  # HTTP is back, but the first try of batch 0 is lost
        env.pump()
        assert env.cloud.telemetry == [] and len(env.agent.telemetry.outbox) == 2  # batch 1 did not jump ahead
        env.pump()
        assert [b.seq for b in env.cloud.telemetry] == [0, 1] and len(env.agent.telemetry.outbox) == 0
    finally:
        env.agent.shutdown()


def test_http_poll_every_interval_only_while_the_link_is_down(tmp_path):
    env = make_env(tmp_path, link=LinkConfig(desired_poll_s=30.0))
    assert env.agent.connect()
    fetches = []

    def polled() -> int:
        fetches.append(env.cloud.desired_fetches)
        return fetches[-1] - (fetches[-2] if len(fetches) > 1 else 0)

    try:
        env.pump()
        assert polled() == 2  # at start and on the link's connect
        env.clock.advance(100)
        env.pump()
        assert polled() == 0  # link up: the link brings news, no poll
        env.link.disconnect()
        env.cloud.desired = env.doc(1, generation=1)
        env.pump()
        assert polled() == 1  # down, and 100 s since the last fetch: poll now
        assert env.agent.store.state.highest_generation == 1  # what the poll brought was accepted
        env.pump()
        env.clock.advance(29.5)
        env.pump()
        assert polled() == 0  # not before desired_poll_s
        env.clock.advance(0.5)
        env.pump()
        assert polled() == 1
        env.clock.advance(30)
        env.pump()
        assert polled() == 1
        env.link.connect()
        env.pump()
        assert polled() == 1  # the reconnect fetch
        env.clock.advance(300)
        env.pump()
        assert polled() == 0  # up again: no polls
    finally:
        env.agent.shutdown()


def test_converge_running_out_of_rounds_is_reported_then_cleared(tmp_path, caplog):
    env = make_env(tmp_path, reconcile=ReconcileConfig(max_rounds=1))  # a fresh install takes three rounds
    assert env.agent.connect()
    try:
        env.pump()
        env.link.deliver(env.doc(1, generation=1))
        with caplog.at_level(logging.WARNING, logger="edgefleet.edge_agent.apply"):
            env.agent.run_once(0)
        stalled = env.link.reported[-1].last_error
        assert stalled.startswith("reconcile stopped after 1 rounds without converging")
        assert "last round report, install digits v1" in stalled and "still planned report" in stalled
        assert any("reconcile stopped after 1 rounds" in r.getMessage() for r in caplog.records)
        assert env.agent.installer.active_version("digits") == 1
        env.agent.run_once(0)  # the next tick finishes: the error goes again
        last = env.link.reported[-1]
        assert last.last_error is None and last.models[0].state == "active"
    finally:
        env.agent.shutdown()


def test_a_refusal_that_could_not_be_reported_goes_out_on_a_later_tick(env):
    env.link.deliver(env.doc(1, generation=1))
    env.pump()
    env.link.disconnect()
    env.cloud.reachable = False
    env.link.deliver(env.doc(1, generation=1))  # same generation: quiet
    env.link.deliver(b"garbage")
    env.pump()
    assert env.link.reported[-1].last_error is None and env.agent.last_error is not None
    env.cloud.reachable = True
    env.pump()
    assert "refused desired state" in env.cloud.reported[-1].last_error


def test_the_real_loop_on_a_thread_converges_and_stops(tmp_path):
    env = make_env(tmp_path, reconcile=ReconcileConfig(tick_s=0.05))
    thread = threading.Thread(target=env.agent.run, name="agent-loop", daemon=True)
    thread.start()
    try:
        wait_for(lambda: env.link.started, 10, what="the agent enrolled and started its link")
        assert [r.device_id for r in env.cloud.enrolls] == ["dev-1"]
        env.link.deliver(env.doc(1, generation=1))  # from another thread, as paho's would
        wait_for(lambda: env.agent.installer.active_version("digits") == 1, 30, what="v1 active")
        wait_for(lambda: env.link.reported and env.link.reported[-1].models[0].state == "active", 10,
                 what="active reported")
    finally:
        env.agent.stop()
        thread.join(10)
    assert not thread.is_alive()
    assert env.link.stopped and env.cloud.closed
    # Restarted from disk: the saved enrollment and generation hold; the same document is a quiet duplicate.
    again = Agent(env.agent.config, link_factory=MemoryLink().attach, client=env.cloud, clock=env.clock,
                  trust_factory=lambda _enrollment: env.repo)
    assert again.connect() and len(env.cloud.enrolls) == 1
    try:
        again.link.deliver(env.doc(1, generation=1))
        pump(again)
        assert refusals(again) == 0 and again.store.state.highest_generation == 1
        assert again.installer.active_version("digits") == 1 and again.last_error is None
    finally:
        again.shutdown()


def test_production_defaults(tmp_path):
    config = kit.make_config(tmp_path, mqtt=MqttConfig(host="10.0.0.7", port=1884))
    agent = Agent(config)
    try:
        assert isinstance(agent.client, CloudClient) and isinstance(agent.clock, SystemClock)
        link = agent.link_factory(enrollment([]), on_desired=lambda raw: None, on_connected=lambda: None)
        assert isinstance(link, MqttLink) and not link.connected  # built, not started
        assert (link._host, link._port) == ("10.0.0.7", 1884)
        assert config.desired_poll_s == config.retry.retry_max_s and config.reconcile.max_rounds == 20
    finally:
        agent.client.close()
