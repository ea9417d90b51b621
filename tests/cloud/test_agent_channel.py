"""cloud/agent_channel.py against the real cloud (CloudRuntime, SQLite, a real gRPC port) with a raw gRPC client:
desired states pushed on connect and on change, reported state, status and telemetry stored and answered (telemetry
only after its commit), auth, garbage of every kind counted while the stream lives on, a second connect closing the
first, FetchArtifact from an offset, and the committed generated modules matching the proto."""

from __future__ import annotations

import json
import queue
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from edgefleet.cloud.agent_channel import DEVICE_ID_HEADER
from edgefleet.protos import agent_channel_codegen
from edgefleet.protos import agent_channel_pb2 as pb
from edgefleet.protos import agent_channel_pb2_grpc as pb_grpc
from edgefleet.protos.messages import (
    DeviceStatus,
    EnrollResponse,
    ReportedState,
    SignedDesiredState,
    TelemetryAck,
    TelemetryBatch,
    TelemetryWindow,
    parse_message,
)
from tests.cloud_server import CloudServer, cloud_server, enroll_device, start_cloud_server, tiny_onnx
from tests.harness import wait_for

_CONNECT = "/edgefleet.v1.AgentChannel/Connect"


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


@pytest.fixture
def cloud(tmp_path: Path):
    with cloud_server(tmp_path / "cloud", agent_channel_port=0) as server:
        yield server


def port_of(cloud: CloudServer) -> int:
    return cloud.runtime.agent_channel.port


class RawStream:
    """A Connect call whose requests are AgentMessages or raw bytes; what comes back is queued in `received`."""

    def __init__(self, port: int, token: str | None, *, device_id: str | None = None) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        connect = self.channel.stream_stream(
            _CONNECT, request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
            response_deserializer=pb.CloudMessage.FromString)
        metadata = ([("authorization", f"Bearer {token}")] if token else []) + \
            ([(DEVICE_ID_HEADER, device_id)] if device_id else [])
        self._out: queue.Queue[Any] = queue.Queue()
        self.received: queue.Queue[Any] = queue.Queue()
        self.ended = threading.Event()
        self.error: grpc.RpcError | None = None
        self.call = connect(iter(self._out.get, None), metadata=metadata)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for message in self.call:
                self.received.put(message)
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.ended.set()

    def send(self, message: Any) -> None:
        self._out.put(message)

    def next(self, kind: str | None = None, timeout_s: float = 10.0) -> Any:
        """The next message (of `kind`, skipping others)."""
        while True:
            message = self.received.get(timeout=timeout_s)
            if kind is None or message.WhichOneof("payload") == kind:
                return message

    def code(self, timeout_s: float = 10.0) -> grpc.StatusCode:
        assert self.ended.wait(timeout_s), "the stream did not end"
        assert self.error is not None
        return self.error.code()

    def close(self) -> None:
        self._out.put(None)
        self.call.cancel()
        self.channel.close()


@pytest.fixture
def streams():
    opened: list[RawStream] = []

    def open_stream(*args: Any, **kwargs: Any) -> RawStream:
        stream = RawStream(*args, **kwargs)
        opened.append(stream)
        return stream

    yield open_stream
    for stream in opened:
        stream.close()


def enroll(cloud: CloudServer, device_id: str) -> EnrollResponse:
    with cloud.client() as admin:
        return enroll_device(admin, device_id)


def deploy(cloud: CloudServer, device_id: str, name: str = "digits") -> dict[str, Any]:
    with cloud.client() as admin:
        r = admin.post("/api/v1/models", params={"name": name}, content=tiny_onnx(),
                       headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        r = admin.post("/api/v1/deployments", json={"model": name, "device_id": device_id})
        assert r.status_code == 201, r.text
        return r.json()


def batch(device_id: str, seq: int, *, count: int = 3) -> TelemetryBatch:
    now = _now()
    window = TelemetryWindow(model="digits", version=1, start=now, end=now, count=count, errors=0)
    return TelemetryBatch(device_id=device_id, seq=seq, windows=[window], sent_at=now)


def desired_of(message: Any) -> SignedDesiredState:
    return parse_message(message.desired, SignedDesiredState)


def test_desired_state_is_pushed_on_connect_and_on_change(cloud, streams):
    dev = enroll(cloud, "dev-1")
    enroll(cloud, "dev-2")
    s = streams(port_of(cloud), dev.device_token, device_id="dev-1")
    first = s.next()
    assert first.WhichOneof("payload") == "desired"
    # The exact bytes the cloud signed and stored: what the HTTP route serves too.
    stored = cloud.fleet.desired_state("dev-1")
    assert first.desired == stored.to_wire()
    assert desired_of(first).payload.device_id == "dev-1"
    wait_for(lambda: cloud.runtime.agent_channel.hub.connected() == ["dev-1"], what="the stream attached")

    deploy(cloud, "dev-2")  # another device's deployment reaches dev-2's stream only (none open): nothing here
    deploy(cloud, "dev-1", name="other")
    pushed = desired_of(s.next("desired"))
    assert pushed.payload.generation > desired_of(first).payload.generation
    assert [m.name for m in pushed.payload.models] == ["other"]
    assert s.received.empty()


def test_reports_status_and_telemetry_are_stored_and_answered(cloud, streams):
    dev = enroll(cloud, "dev-1")
    s = streams(port_of(cloud), dev.device_token)
    generation = desired_of(s.next("desired")).payload.generation
    report = ReportedState(device_id="dev-1", generation=generation, reported_at=_now(), last_error="boom")
    s.send(pb.AgentMessage(id=1, reported=report.to_wire()))
    receipt = s.next("receipt").receipt
    assert (receipt.id, receipt.refused) == (1, False)
    view = cloud.fleet.get_device("dev-1")
    assert (view.reported_generation, view.last_error) == (generation, "boom")  # stored before the receipt

    s.send(pb.AgentMessage(id=2, status=DeviceStatus(device_id="dev-1", online=True, at=_now()).to_wire()))
    assert s.next("receipt").receipt.id == 2
    assert cloud.fleet.get_device("dev-1").online

    before = cloud.fleet.counters().get("telemetry_batches", 0)
    s.send(pb.AgentMessage(telemetry=batch("dev-1", 1).to_wire()))
    ack = parse_message(s.next("telemetry_ack").telemetry_ack, TelemetryAck)
    assert (ack.device_id, ack.seqs, ack.refused) == ("dev-1", [1], [])
    assert cloud.fleet.counters()["telemetry_batches"] == before + 1  # committed before the ack

    # The stream ends without a goodbye: the device is marked offline, the last will's job.
    s.close()
    wait_for(lambda: not cloud.fleet.get_device("dev-1").online, what="the device marked offline")


def test_telemetry_is_acked_only_after_the_commit(cloud, streams, monkeypatch):
    dev = enroll(cloud, "dev-1")
    s = streams(port_of(cloud), dev.device_token)
    s.next("desired")
    hub = cloud.runtime.agent_channel.hub
    store = cloud.fleet.store
    real = store.add_telemetry_many
    calls = {"n": 0}

    def failing_once(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("database is down")
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "add_telemetry_many", failing_once)
    wire = batch("dev-1", 7).to_wire()
    s.send(pb.AgentMessage(telemetry=wire))
    wait_for(lambda: hub.counters["ingest_errors"] == 1, what="the failed commit")
    # A report sent after the batch is answered, so the stream has moved past the batch: no ack was sent for it.
    s.send(pb.AgentMessage(id=9, status=DeviceStatus(device_id="dev-1", online=True, at=_now()).to_wire()))
    assert s.next().receipt.id == 9
    assert s.received.empty()
    assert cloud.fleet.counters().get("telemetry_batches", 0) == 0

    s.send(pb.AgentMessage(telemetry=wire))  # the agent resends: stored, acked
    assert parse_message(s.next("telemetry_ack").telemetry_ack, TelemetryAck).seqs == [7]
    s.send(pb.AgentMessage(telemetry=wire))  # and again (its ack was lost): acked, stored once
    assert parse_message(s.next("telemetry_ack").telemetry_ack, TelemetryAck).seqs == [7]
    counters = cloud.fleet.counters()
    assert (counters["telemetry_batches"], counters["telemetry_replayed"]) == (1, 1)


def test_auth_is_checked_once_per_call(cloud, streams):
    dev = enroll(cloud, "dev-1")
    enroll(cloud, "dev-2")
    port = port_of(cloud)
    assert streams(port, None).code() == grpc.StatusCode.UNAUTHENTICATED
    assert streams(port, "efd_not-a-token").code() == grpc.StatusCode.UNAUTHENTICATED
    admin = streams(port, cloud.admin_token)
    assert admin.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "device token" in admin.error.details()
    with cloud.client() as client:
        enroll_token = client.post("/api/v1/enrollment-tokens", json={"note": "t"}).json()["token"]
    assert streams(port, enroll_token).code() == grpc.StatusCode.PERMISSION_DENIED
    # A device may speak only as itself.
    other = streams(port, dev.device_token, device_id="dev-2")
    assert other.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "dev-1" in other.error.details() and "dev-2" in other.error.details()
    assert cloud.runtime.agent_channel.hub.connected() == []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.AgentChannelStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.FetchArtifact(pb.FetchRequest(target="bundles/x/v1/rpi4.tar.gz")))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_garbage_is_refused_and_counted_and_the_stream_lives_on(cloud, streams):
    dev = enroll(cloud, "dev-1")
    enroll(cloud, "dev-2")
    s = streams(port_of(cloud), dev.device_token)
    generation = desired_of(s.next("desired")).payload.generation
    hub = cloud.runtime.agent_channel.hub
    counted = cloud.fleet.counters().get("malformed_messages", 0)
    report = ReportedState(device_id="dev-1", generation=generation, reported_at=_now())
    foreign = report.model_copy(update={"device_id": "dev-2"})
    status = DeviceStatus(device_id="dev-1", online=True, at=_now())
    garbage = [
        b"\xff\xff\xff\xff garbage",  # not a protobuf AgentMessage at all
        pb.AgentMessage(id=11),  # no payload
        pb.AgentMessage(id=12, reported=b"\x00not json{{"),
        pb.AgentMessage(id=13, reported=status.to_wire()),  # the wrong kind for the channel
        pb.AgentMessage(id=14, reported=foreign.to_wire()),  # another device's id
        pb.AgentMessage(id=15, status=b" " * (300 * 1024)),  # over the contract's 256 KiB, under gRPC's limit
        pb.AgentMessage(telemetry=b"[1, 2, 3]"),
    ]
    for message in garbage:
        s.send(message)
    receipts = [s.next("receipt").receipt for _ in range(5)]
    assert [(r.id, r.refused) for r in receipts] == [(11, True), (12, True), (13, True), (14, True), (15, True)]
    # Counted in the hub, then in the database (the durable counter `fleet stats` shows): wait for the second.
    wait_for(lambda: cloud.fleet.counters()["malformed_messages"] == counted + len(garbage), what="all counted")
    assert hub.counters["malformed_messages"] == len(garbage)
    assert cloud.fleet.get_device("dev-2").reported_generation is None  # dev-1 cannot report for dev-2

    # Readable but outside the contract (errors > count): refused, counted by reason, named in the ack.
    bad = json.loads(batch("dev-1", 5, count=1).to_wire())
    bad["windows"][0]["errors"] = 2  # built past the model, which would refuse it
    s.send(pb.AgentMessage(telemetry=json.dumps(bad).encode()))
    ack = parse_message(s.next("telemetry_ack").telemetry_ack, TelemetryAck)
    assert (ack.seqs, ack.refused, ack.reason) == ([], [5], "inconsistent")
    assert cloud.fleet.counters()["refused_telemetry_inconsistent"] == 1

    # The same stream still carries good messages.
    s.send(pb.AgentMessage(id=20, reported=report.to_wire()))
    assert s.next("receipt").receipt == pb.Receipt(id=20)
    assert cloud.fleet.get_device("dev-1").reported_generation == generation
    assert not s.ended.is_set()


def test_a_message_over_the_grpc_limit_ends_only_its_stream(cloud, streams):
    dev = enroll(cloud, "dev-1")
    s = streams(port_of(cloud), dev.device_token)
    s.next("desired")
    s.send(pb.AgentMessage(id=1, status=b"x" * (2 * 1024 * 1024)))  # past agent_channel_max_message_kb (1 MiB)
    assert s.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    again = streams(port_of(cloud), dev.device_token)
    assert again.next().WhichOneof("payload") == "desired"  # the server serves on


def test_a_second_connect_closes_the_first(cloud, streams):
    dev = enroll(cloud, "dev-1")
    first = streams(port_of(cloud), dev.device_token)
    first.next("desired")
    second = streams(port_of(cloud), dev.device_token)
    second.next("desired")
    assert first.code() == grpc.StatusCode.ABORTED
    assert "connected again" in first.error.details()
    hub = cloud.runtime.agent_channel.hub
    assert hub.counters["superseded"] == 1 and hub.connected() == ["dev-1"]
    deploy(cloud, "dev-1")
    assert [m.name for m in desired_of(second.next("desired")).payload.models] == ["digits"]
    # The replaced stream's end is no last will: the device stays online.
    second.send(pb.AgentMessage(id=1, status=DeviceStatus(device_id="dev-1", online=True, at=_now()).to_wire()))
    assert second.next("receipt").receipt.id == 1
    assert cloud.fleet.get_device("dev-1").online


def test_fetch_artifact_from_an_offset_returns_exactly_the_tail(cloud):
    dev = enroll(cloud, "dev-1")
    bundle = deploy(cloud, "dev-1")["bundles"][0]
    target = bundle["target_path"]
    with httpx.Client(base_url=cloud.base_url, headers={"Authorization": f"Bearer {dev.device_token}"}) as http:
        whole = http.get(f"/tuf/targets/{target}").content
    assert len(whole) == bundle["size_bytes"] > 1000
    with grpc.insecure_channel(f"127.0.0.1:{port_of(cloud)}") as channel:
        stub = pb_grpc.AgentChannelStub(channel)
        metadata = [("authorization", f"Bearer {dev.device_token}")]

        def fetch(offset: int) -> list[Any]:
            return list(stub.FetchArtifact(pb.FetchRequest(target=target, offset=offset), metadata=metadata))

        chunks = fetch(0)
        assert b"".join(c.data for c in chunks) == whole
        assert {c.size for c in chunks} == {len(whole)}
        tail = fetch(1000)
        assert tail[0].offset == 1000 and b"".join(c.data for c in tail) == whole[1000:]
        assert fetch(len(whole)) == []  # a download that had everything: nothing more
        with pytest.raises(grpc.RpcError) as err:
            fetch(len(whole) + 1)
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE and "offset 0" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            list(stub.FetchArtifact(pb.FetchRequest(target="bundles/nope/v1/rpi4.tar.gz"), metadata=metadata))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_agent_channel_is_off_by_default(tmp_path):
    server = start_cloud_server(tmp_path / "cloud")
    try:
        assert server.runtime.agent_channel is None
        assert server.fleet.publish is None  # no MQTT here either: nothing wraps anything
    finally:
        server.stop()


def test_regenerating_gives_exactly_the_committed_files():
    protos = Path(agent_channel_codegen.__file__).resolve().parent
    fresh = agent_channel_codegen.generate()
    assert sorted(fresh) == sorted(agent_channel_codegen.MODULES)
    for name, text in fresh.items():
        assert (protos / name).read_text(encoding="utf-8") == text, f"{name} is stale"
    assert agent_channel_codegen.main(["--check"]) == 0
    assert "from edgefleet.protos import agent_channel_pb2 as" in fresh["agent_channel_pb2_grpc.py"]


def test_with_mqtt_on_too_a_deploy_reaches_both_transports(tmp_path, streams, mosquitto):
    from edgefleet.protos.topics import device_topics
    from tests.cloud_server import MqttProbe

    cloud = start_cloud_server(tmp_path / "cloud", mqtt=(mosquitto.host, mosquitto.port), agent_channel_port=0)
    probe = None
    try:
        dev = enroll(cloud, "dev-1")
        s = streams(port_of(cloud), dev.device_token)
        s.next("desired")
        topic = device_topics(cloud.settings.mqtt_topic_prefix, "dev-1").desired
        probe = MqttProbe(mosquitto.host, mosquitto.port, topics=(topic,))
        deploy(cloud, "dev-1")
        over_grpc = s.next("desired").desired
        generation = parse_message(over_grpc, SignedDesiredState).payload.generation
        over_mqtt = probe.wait_for(topic, lambda m: parse_message(m.payload, SignedDesiredState).payload.generation
                                   == generation)
        assert over_mqtt.payload == over_grpc  # one document, the same bytes on both
    finally:
        if probe is not None:
            probe.stop()
        cloud.stop()


def test_settings_refuse_a_message_limit_under_the_contracts(tmp_path):
    from edgefleet.cloud.errors import Invalid
    from edgefleet.cloud.settings import Settings

    with pytest.raises(Invalid, match="agent_channel_max_message_kb"):
        Settings(data_dir=tmp_path, agent_channel_max_message_kb=256)
    with pytest.raises(Invalid, match="both a certificate and its key"):
        start_cloud_server(tmp_path / "cloud", agent_channel_port=0, agent_channel_tls_cert=tmp_path / "c.pem")


def test_serve_has_the_port_option():
    from typer.testing import CliRunner

    from edgefleet.cloud.main import app

    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--agent-channel-port" in result.output


def _doc(generation: int, keyid: str = "k") -> SignedDesiredState:
    from datetime import timedelta

    from edgefleet.protos.messages import DesiredState, Signature

    now = _now()
    payload = DesiredState(device_id="dev-1", device_class="rpi4", generation=generation, issued_at=now,
                           expires_at=now + timedelta(days=1))
    return SignedDesiredState(payload=payload, signatures=[Signature(keyid=keyid, sig="00")])


def test_a_stream_never_goes_back_in_generations_nor_repeats_a_document():
    from edgefleet.cloud.agent_channel_hub import DeviceStream

    stream = DeviceStream("dev-1")
    pushed = [stream.push_desired(d) for d in (_doc(3), _doc(3), _doc(2), _doc(3, keyid="k2"), _doc(4))]
    assert pushed == [True, False, False, True, True]  # the same generation re-signed is news; the same bytes not
    stream.close()
    assert not stream.push_desired(_doc(5))
    assert [desired_of(m).payload.generation for m in stream.outbound()] == [3, 3, 4]


def test_fan_out_reaches_every_publisher_even_when_one_fails():
    from edgefleet.cloud.agent_channel_hub import FanOut

    got: list[str] = []

    def broken(device_id: str, doc: SignedDesiredState) -> None:
        raise RuntimeError("broker gone")

    fan = FanOut(broken, lambda device_id, doc: got.append(device_id))
    with pytest.raises(RuntimeError, match="broker gone"):  # the Fleet logs and counts it (publish_failed)
        fan("dev-1", _doc(1))
    assert got == ["dev-1"]
