"""edge_agent/link_grpc.py against the real cloud (CloudRuntime on SQLite, the agent channel on a real port):
desired states handed over as the signed bytes on connect and on change, publishes True only on the cloud's answer
(telemetry only after its commit, late acks through take_acked), a cloud stopped and restarted (reconnect, and
on_connected again), a stream stalled without closing (keepalive), a refused token, the config keys, and the lean
import path that keeps grpc out of MQTT agents."""

from __future__ import annotations

import queue
import socket
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from edgefleet.edge_agent.config import AgentConfig, GrpcConfig, RetryConfig, config_from_dict
from edgefleet.edge_agent.errors import ConfigError
from edgefleet.edge_agent.link_grpc import GrpcLink
from edgefleet.edge_agent.trust import DesiredStateVerifier
from edgefleet.protos.messages import (
    DeviceStatus,
    EnrollResponse,
    ReportedState,
    SignedDesiredState,
    TelemetryBatch,
    TelemetryWindow,
    parse_message,
)
from tests.cloud_server import (
    CloudServer,
    cloud_server,
    enroll_device,
    push_desired,
    start_cloud_server,
    target_of,
    tiny_onnx,
)
from tests.harness import wait_for
from tests.netproxy import DelayProxy


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


class Recorder:
    """The daemon's side of the seam: what the link handed over, in order."""

    def __init__(self) -> None:
        self.desired: queue.Queue[bytes] = queue.Queue()
        self.connects = 0

    def on_desired(self, raw: bytes) -> None:
        self.desired.put(raw)

    def on_connected(self) -> None:
        self.connects += 1

    def next_desired(self, timeout_s: float = 10.0) -> SignedDesiredState:
        return parse_message(self.desired.get(timeout=timeout_s), SignedDesiredState)


@pytest.fixture
def cloud(tmp_path: Path):
    with cloud_server(tmp_path / "cloud", agent_channel_port=0) as server:
        yield server


@pytest.fixture
def links():
    made: list[GrpcLink] = []

    def make(target: str, enrollment: EnrollResponse, recorder: Recorder, *, token: str | None = None,
             **kwargs: Any) -> GrpcLink:
        kwargs = {"retry_initial_s": 0.05, "retry_max_s": 0.3} | kwargs
        link = GrpcLink(target, enrollment.device_id, token or enrollment.device_token,
                        on_desired=recorder.on_desired, on_connected=recorder.on_connected, **kwargs)
        made.append(link)
        link.start()
        return link

    yield make
    for link in made:
        link.stop(graceful=False)


def enroll(cloud: CloudServer, device_id: str = "dev-1") -> EnrollResponse:
    with cloud.client() as admin:
        return enroll_device(admin, device_id)


def deploy(cloud: CloudServer, device_id: str = "dev-1", name: str = "digits") -> None:
    with cloud.client() as admin:
        r = admin.post("/api/v1/models", params={"name": name}, content=tiny_onnx(),
                       headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        r = admin.post("/api/v1/deployments", json={"model": name, "device_id": device_id})
        assert r.status_code == 201, r.text


def batch(device_id: str, seq: int) -> TelemetryBatch:
    now = _now()
    window = TelemetryWindow(model="digits", version=1, start=now, end=now, count=3, errors=0)
    return TelemetryBatch(device_id=device_id, seq=seq, windows=[window], sent_at=now)


def test_desired_state_arrives_as_the_signed_bytes_on_connect_and_on_change(cloud, links):
    enrollment = enroll(cloud)
    rec = Recorder()
    link = links(target_of(cloud), enrollment, rec)
    first = rec.desired.get(timeout=10)
    assert link.connected and rec.connects == 1
    assert first == cloud.fleet.desired_state("dev-1").to_wire()
    # The bytes verify as the daemon verifies them: the signature survived the transport.
    verifier = DesiredStateVerifier(enrollment.desired_state_keys)
    state = verifier.verify(first, device_id="dev-1", device_class=enrollment.device_class.name,
                            highest_generation=None, now=_now())
    deploy(cloud)
    pushed = rec.next_desired()
    assert pushed.payload.generation > state.generation
    assert [m.name for m in pushed.payload.models] == ["digits"]
    verifier.verify(cloud.fleet.desired_state("dev-1").to_wire(), device_id="dev-1",
                    device_class=enrollment.device_class.name, highest_generation=state.generation, now=_now())


def test_publishes_are_true_only_on_the_clouds_answer(cloud, links):
    enrollment = enroll(cloud)
    rec = Recorder()
    link = links(target_of(cloud), enrollment, rec)
    generation = rec.next_desired().payload.generation
    report = ReportedState(device_id="dev-1", generation=generation, reported_at=_now(), last_error="x")
    assert link.publish_reported(report, 10)
    assert cloud.fleet.get_device("dev-1").last_error == "x"  # stored before the receipt came
    assert link.publish_status(DeviceStatus(device_id="dev-1", online=True, at=_now()), 10)
    assert link.publish_telemetry(batch("dev-1", 1), 10)
    assert cloud.fleet.counters()["telemetry_batches"] == 1
    assert link.take_acked() == []
    link.stop()  # graceful: says offline, and the cloud does not wait for a last will
    assert not cloud.fleet.get_device("dev-1").online
    assert not link.publish_reported(report, 1)  # stopped: False at once, the daemon takes HTTP


def test_telemetry_is_confirmed_only_after_the_commit(cloud, links, monkeypatch):
    enrollment = enroll(cloud)
    rec = Recorder()
    link = links(target_of(cloud), enrollment, rec)
    rec.desired.get(timeout=10)
    store = cloud.fleet.store
    real = store.add_telemetry_many
    failures = [RuntimeError("database is down")]
    release = threading.Event()

    def flaky(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        release.wait(10)  # a slow commit: the link stops waiting first
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "add_telemetry_many", flaky)
    hub = cloud.runtime.agent_channel.hub
    assert not link.publish_telemetry(batch("dev-1", 3), 5)  # the commit failed: no ack, kept in the outbox
    assert hub.counters["ingest_errors"] == 1
    assert not link.publish_telemetry(batch("dev-1", 3), 0.2)  # resent; the commit is slow this time
    release.set()
    assert wait_for(link.take_acked, what="the late ack") == [(0, 3)]
    assert link.publish_telemetry(batch("dev-1", 3), 10)  # once more (the outbox had not seen the late ack)
    counters = cloud.fleet.counters()
    assert (counters["telemetry_batches"], counters["telemetry_replayed"]) == (1, 1)


def test_the_link_reconnects_after_the_cloud_is_stopped_and_restarted(tmp_path, links, caplog):
    cloud = start_cloud_server(tmp_path / "cloud", agent_channel_port=0)
    port = cloud.runtime.agent_channel.port
    try:
        enrollment = enroll(cloud)
        rec = Recorder()
        link = links(f"127.0.0.1:{port}", enrollment, rec)
        rec.desired.get(timeout=10)
        stream = cloud.runtime.agent_channel.hub.stream_of("dev-1")
        cloud.stop()  # mid-stream
        wait_for(lambda: not link.connected, what="the link to notice")
        assert stream is not None and stream.closed
        assert any("UNAVAILABLE" in r.getMessage() and "cloud is stopping" in r.getMessage() for r in caplog.records)
        assert not link.publish_status(DeviceStatus(device_id="dev-1", online=True, at=_now()), 5)
        cloud = start_cloud_server(tmp_path / "cloud", agent_channel_port=port)  # same data, same port
        assert rec.desired.get(timeout=15) == cloud.fleet.desired_state("dev-1").to_wire()
        assert link.connected and rec.connects == 2 and link.sessions == 2
        assert link.publish_status(DeviceStatus(device_id="dev-1", online=True, at=_now()), 10)
        assert cloud.fleet.get_device("dev-1").online
    finally:
        cloud.stop()


def test_a_stalled_stream_is_found_by_keepalive_on_both_sides(tmp_path, links):
    # 0.5 s pings, 0.5 s to answer: the stall is found within about a second (the defaults take 40 s).
    cloud = start_cloud_server(tmp_path / "cloud", agent_channel_port=0, agent_channel_keepalive_s=0.5,
                               agent_channel_keepalive_timeout_s=0.5, agent_channel_min_ping_s=0.1)
    proxy = DelayProxy(cloud.runtime.agent_channel.port)
    try:
        enrollment = enroll(cloud)
        rec = Recorder()
        link = links(f"127.0.0.1:{proxy.port}", enrollment, rec, keepalive_s=0.5, keepalive_timeout_s=0.5)
        rec.desired.get(timeout=10)
        assert link.publish_status(DeviceStatus(device_id="dev-1", online=True, at=_now()), 10)
        hub = cloud.runtime.agent_channel.hub
        assert hub.connected() == ["dev-1"]
        proxy.flowing.clear()  # the network stalls; no socket closes
        wait_for(lambda: not link.connected, timeout_s=10, what="the agent's keepalive to give up")
        wait_for(lambda: hub.connected() == [], timeout_s=10, what="the cloud's keepalive to give up")
        wait_for(lambda: not cloud.fleet.get_device("dev-1").online, what="the device marked offline")
        proxy.flowing.set()
        wait_for(lambda: link.connected and rec.connects == 2, timeout_s=15, what="the reconnect")
    finally:
        proxy.stop()
        cloud.stop()


def test_a_refused_token_never_connects_and_keeps_retrying(cloud, links):
    enrollment = enroll(cloud)
    rec = Recorder()
    link = links(target_of(cloud), enrollment, rec, token="efd_revoked")
    wait_for(lambda: link.attempts >= 3, what="retries")
    assert not link.connected and link.sessions == 0 and rec.connects == 0 and rec.desired.empty()


def test_nothing_listening_is_retried_with_backoff_and_never_blocks(cloud, links):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    rec = Recorder()
    link = links(f"127.0.0.1:{port}", enroll(cloud), rec)
    assert not link.publish_reported(ReportedState(device_id="dev-1", generation=0, reported_at=_now()), 5)
    wait_for(lambda: link.attempts >= 3, what="retries")
    assert not link.connected and rec.connects == 0


BASE = {"device_id": "dev-1", "device_class": "rpi4", "cloud_url": "http://cloud:8080", "data_dir": "/tmp/x"}


@pytest.mark.parametrize(("extra", "needle"), [
    ({"transport": "grcp"}, "did you mean 'grpc'"),
    ({"transport": "grpc", "grpc": {"target": "http://cloud:8082"}}, "not a URL"),
    ({"transport": "grpc", "grpc": {"target": "cloud"}}, "host:port"),
    ({"transport": "grpc", "grpc": {"target": "cloud:99999"}}, "1 to 65535"),
    ({"transport": "grpc", "grpc": {"target": "cloud:8082", "keepalive_s": 0}}, "'grpc.keepalive_s' must be > 0"),
    ({"transport": "grpc", "grpc": {"target": "cloud:8082", "tls": False, "ca_file": "ca.pem"}}, "set tls = true"),
    ({"transport": "grpc", "grpc": {"target": "cloud:8082", "tls": "yes"}}, "'grpc.tls' must be true or false"),
    ({"grpc": {"targt": "cloud:8082"}}, "did you mean 'grpc.target'"),
])
def test_garbage_in_the_grpc_config_is_one_clear_line(extra, needle):
    with pytest.raises(ConfigError) as err:
        config_from_dict(BASE | extra, source="agent.toml")
    assert needle in str(err.value) and "agent.toml" in str(err.value)


def test_a_grpc_config_builds_and_the_daemon_picks_the_grpc_link(tmp_path):
    config = config_from_dict(BASE | {"data_dir": str(tmp_path / "data"), "transport": "grpc",
                                      "grpc": {"target": "cloud:8082", "ca_file": "ca.pem"}},
                              base_dir=tmp_path)
    assert config.transport == "grpc"
    assert config.grpc == GrpcConfig(target="cloud:8082", ca_file=str(tmp_path / "ca.pem"))
    assert config_from_dict(BASE).transport == "mqtt"  # the default, as before
    # No target: the link asks the cloud where its channel is (tests/cloud/test_agent_channel_discovery.py).
    assert config_from_dict(BASE | {"transport": "grpc"}).grpc.target == ""
    from edgefleet.edge_agent.daemon import Agent

    agent = Agent(config)
    try:
        assert agent.link_factory.func == GrpcLink.from_config
    finally:
        agent.client.close()


def test_from_config_takes_the_target_and_the_enrollment_token(tmp_path):
    config = AgentConfig(device_id="dev-1", device_class="rpi4", cloud_url="http://c:1", data_dir=tmp_path,
                         transport="grpc", grpc=GrpcConfig(target="c:2", keepalive_s=7),
                         retry=RetryConfig(retry_initial_s=0.5, retry_max_s=2))
    enrollment = EnrollResponse.model_construct(device_id="dev-1", device_token="efd_tok")
    link = GrpcLink.from_config(config, enrollment, on_desired=lambda raw: None, on_connected=lambda: None)
    assert (link.target, link.device_id, link._token, link._keepalive_s, link._tls) == ("c:2", "dev-1", "efd_tok",
                                                                                        7, False)


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_an_mqtt_agent_never_loads_grpc():
    run = _python("import sys\nimport edgefleet.edge_agent.link_grpc, edgefleet.edge_agent.daemon\n"
                  "print(sorted(m for m in sys.modules if m.split('.')[0] == 'grpc' or m.startswith('google.protobuf')"
                  " or 'agent_channel_pb2' in m))")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_without_grpcio_the_agent_says_how_to_install_it():
    run = _python("import sys\nsys.modules['grpc'] = None\n"
                  "from edgefleet.edge_agent.link_grpc import require_grpc\n"
                  "from edgefleet.edge_agent.errors import ConfigError\n"
                  "try:\n    require_grpc()\nexcept ConfigError as exc:\n    print(exc)\n")
    assert run.returncode == 0, run.stderr
    assert "pip install 'edgefleet[agent,grpc]'" in run.stdout and "transport = \"mqtt\"" in run.stdout


def test_a_real_agent_over_grpc_installs_reports_and_refuses_hostile_pushes(tmp_path):
    """`edgefleet-agent run` with transport = "grpc" against a cloud without MQTT: the deployment arrives on the
    stream, is verified and installed, reports come back; a foreign and a replayed document pushed down the stream
    are refused by the daemon's usual verification and named in last_error."""
    from tests.e2e.agent_process import AgentProcess

    cloud = start_cloud_server(tmp_path / "cloud", agent_channel_port=0)
    agent = None
    try:
        with cloud.client() as admin:
            token = admin.post("/api/v1/enrollment-tokens", json={"note": "grpc"}).json()["token"]
            agent = AgentProcess(tmp_path / "agents", "pi-1", "rpi4", cloud.base_url, token)
            agent.config.write_text('transport = "grpc"\n' + agent.config.read_text()
                                    + f'[grpc]\ntarget = "{target_of(cloud)}"\n')
            agent.start()
            hub = cloud.runtime.agent_channel.hub
            wait_for(lambda: hub.connected() == ["pi-1"], 20, what="the agent's stream")
            old = cloud.fleet.desired_state("pi-1")
            deploy(cloud, "pi-1", name="tiny")

            def in_sync() -> bool:
                view = cloud.fleet.get_device("pi-1")
                return bool(view.models) and view.models[0].state == "active"
            wait_for(in_sync, 30, what="the model active on the agent")
            assert agent.infer("tiny", [0.5, -1.0, 2.0, 0.25], [1, 4])["model_name"] == "tiny"
            assert "from grpc" in agent.log_text()  # the deployment came down the stream
            assert cloud.fleet.get_device("pi-1").online

            enroll(cloud, "pi-2")
            foreign = cloud.fleet.desired_state("pi-2")
            push_desired(cloud, "pi-1", foreign.to_wire())
            wait_for(lambda: "pi-2" in (cloud.fleet.get_device("pi-1").last_error or ""), 20,
                     what="the foreign document refused")
            push_desired(cloud, "pi-1", old.to_wire())  # signed, its own, but older: a replay
            wait_for(lambda: "refused desired state from grpc" in (cloud.fleet.get_device("pi-1").last_error or "")
                     and "pi-2" not in cloud.fleet.get_device("pi-1").last_error, 20, what="the replay refused")
            assert agent.infer("tiny", [0.5, -1.0, 2.0, 0.25], [1, 4])["model_name"] == "tiny"  # still serving
            assert agent.stop() == 0
            agent = None
            wait_for(lambda: not cloud.fleet.get_device("pi-1").online, what="the goodbye")
    finally:
        if agent is not None:
            agent.stop()
        cloud.stop()


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, PEM files; the certificate is its own CA."""
    import ipaddress
    from datetime import timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgefleet test cloud")])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cloud.pem", tmp_path / "cloud.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_with_a_certificate_and_key(tmp_path, links):
    cert, key = _self_signed(tmp_path)
    cloud = start_cloud_server(tmp_path / "cloud", agent_channel_port=0, agent_channel_tls_cert=cert,
                               agent_channel_tls_key=key)
    try:
        enrollment = enroll(cloud)
        rec = Recorder()
        link = links(target_of(cloud), enrollment, rec, ca_file=cert)
        assert rec.desired.get(timeout=10) == cloud.fleet.desired_state("dev-1").to_wire()
        assert link.publish_status(DeviceStatus(device_id="dev-1", online=True, at=_now()), 10)
        plain = links(target_of(cloud), enrollment, Recorder())  # plaintext to a TLS port: never connects
        wait_for(lambda: plain.attempts >= 2, what="plaintext retries")
        assert not plain.connected and plain.sessions == 0
    finally:
        cloud.stop()
