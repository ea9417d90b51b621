"""Test helpers: the real cloud under uvicorn on a real port, and a small MQTT client that records what it sees.

    start_cloud_server(data_dir: Path, *, db_url: str | None = None,
                       mqtt: tuple[str, int] | Literal["embedded"] | None = None,
                       http_port: int | None = None, **settings: Any) -> CloudServer
        Runs `edgefleet.cloud.main.CloudRuntime` (the same wiring as `edgefleet-cloud serve`: Fleet.from_settings
        with migrations, admin token, broker, MQTT bridge, refresher) and uvicorn in a background thread on a port
        the OS picked. `data_dir` is the cloud's own (created). `db_url`: None for SQLite in data_dir, or the
        `db_url`/`pg_url` fixture. `mqtt`: None runs no bridge (desired states are not published);
        (host, port) bridges to that broker (e.g. the `mosquitto` fixture's) with `mqtt_auth="none"` (an open broker;
        pass `**Mosquitto(..., dynsec=True).cloud_settings()` for a secured one); "embedded" starts amqtt on a free
        port, secured like the real default (device logins checked in-process; `mqtt_auth="none"` opens it).
        `wait_mqtt=False` starts without waiting for the bridge (a broker that is down on purpose).
        `http_port`: the HTTP port (default: one the OS picked); with the same data_dir, a cloud restarted where the
        agents already point. `agent_channel_port=0` (a `Settings` field) also serves the gRPC agent channel on a free
        port (`target_of(server)` is its host:port); a fixed port keeps it there across a restart.
        `settings`: any other `Settings` field (max_model_mb=1, desired_state_ttl_s=60, refresh_interval_s=...).

    CloudServer: .base_url ("http://127.0.0.1:PORT"), .admin_token, .data_dir, .settings, .fleet, .runtime,
        .mqtt_host / .mqtt_port (None without MQTT), .bridge, .mqtt_login (the cloud's broker login),
        .client(token=...) -> httpx.Client, .stop() (idempotent; also a context manager).

    cloud_server(data_dir, **same) -> context manager yielding a CloudServer, stopped on exit.

    target_of(server) -> "127.0.0.1:PORT", the agent channel's target (an agent's `[grpc] target`).
    push_desired(server, device_id, raw: bytes, timeout_s=10) -> sends `raw` down that device's agent-channel stream
        as a desired state, bypassing the cloud's checks (a hostile push: a replay, another device's, garbage);
        waits for the device's stream (`stream=` a stream to wait past, e.g. the one before a restart).

    tiny_onnx(n_in=4, n_out=2) -> bytes: a valid MatMul ONNX model (x: [1, n_in] float32 -> y: [1, n_out]).
    enroll_device(admin: httpx.Client, device_id, device_class="rpi4", labels=None) -> EnrollResponse: makes an
        enrollment token with the admin client, enrolls with it, returns the answer (device token inside).

    serve_app(app) -> AppServer: any ASGI app (e.g. `create_app(fake_fleet)`) under uvicorn on a free port;
        .base_url, .port, .stop().

    mqtt_connack(host, port, client_id=..., username=None, password=None) -> the CONNACK reason code of one
        connect (no retries), e.g. to check a broker refuses a login.

    MqttProbe(host, port, topics=(...), username=None, password=None) : a paho 2.x client that records
        (topic, payload, retain) tuples;
        .wait_for(topic, predicate=None, timeout_s=10) -> the first matching message; .publish(topic, payload,
        retain=False, qos=1) waits for the PUBACK; .stop().

Every thread a helper starts is stopped by `stop()`; waits are bounded (`harness.wait_for`).
"""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import paho.mqtt.client as mqtt
import uvicorn
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.cloud.main import CloudRuntime
from edgefleet.cloud.settings import Settings
from edgefleet.protos.messages import EnrollResponse
from tests.harness import free_port, wait_for


class AppServer:
    """Any ASGI app under uvicorn in a daemon thread, on a socket bound before Settings need the port."""

    def __init__(self, sock: socket.socket | None = None, port: int = 0) -> None:
        if sock is None:
            # IPPROTO_TCP named, as getaddrinfo gives it to `edgefleet-cloud serve`: asyncio sets TCP_NODELAY only on
            # connections of a socket whose proto says TCP. Without it each answer on a kept-alive connection
            # (uvicorn writes head and body apart) waited ~45 ms for the client's delayed ACK (Nagle).
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, app: Any) -> AppServer:
        self._server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self.sock]},
                                        name="test-uvicorn", daemon=True)
        self._thread.start()
        wait_for(lambda: self._server.started or not self._thread.is_alive(), 15, what="uvicorn to start")
        if not self._server.started:
            raise RuntimeError("uvicorn did not start; see the log above")
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(15)
        self._server = self._thread = None
        self.sock.close()


def serve_app(app: Any) -> AppServer:
    """Run an ASGI app (e.g. `create_app(fake_fleet)`) on a free port; `.base_url`, `.stop()`."""
    return AppServer().start(app)


@dataclass
class CloudServer:
    base_url: str
    admin_token: str
    data_dir: Path
    settings: Settings
    runtime: CloudRuntime
    mqtt_host: str | None
    mqtt_port: int | None
    _http: AppServer
    _stopped: bool = False

    @property
    def fleet(self) -> Any:
        return self.runtime.fleet

    @property
    def bridge(self) -> Any:
        return self.runtime.bridge

    @property
    def mqtt_login(self) -> Any:
        from edgefleet.cloud.mqtt_accounts import cloud_login

        return cloud_login(self.settings)

    def client(self, token: str | None = None, **kwargs: Any) -> httpx.Client:
        """An httpx client on base_url, with `token` (default: the admin token; "" for none) as a bearer."""
        token = self.admin_token if token is None else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=kwargs.pop("timeout", 30), **kwargs)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._http.stop()
        self.runtime.stop()

    def __enter__(self) -> CloudServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_cloud_server(
    data_dir: Path,
    *,
    db_url: str | None = None,
    mqtt: tuple[str, int] | Literal["embedded"] | None = None,
    wait_mqtt: bool = True,
    http_port: int | None = None,
    **settings: Any,
) -> CloudServer:
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    http = AppServer(port=http_port or 0)  # bound first: public_url (in enrollment answers) needs the port
    # The bridge's reconnect backoff at test scale (the agents' in tests/e2e use 0.2 s .. 1 s): with the default 30 s
    # cap, a broker started late could wait for a full-jitter draw of up to 30 s.
    values: dict[str, Any] = {"data_dir": data_dir, "host": "127.0.0.1", "port": http.port,
                              "public_url": http.base_url, "database_url": db_url,
                              "mqtt_retry_initial_s": 0.2, "mqtt_retry_max_s": 2.0}
    if mqtt == "embedded":
        values |= {"mqtt_host": "127.0.0.1", "mqtt_port": free_port(), "embedded_broker": "always"}
    elif mqtt is not None:
        values |= {"mqtt_host": mqtt[0], "mqtt_port": mqtt[1], "embedded_broker": "never", "mqtt_auth": "none"}
    values |= settings
    runtime = CloudRuntime(Settings(**values), mqtt=mqtt is not None)
    cfg = runtime.settings
    try:
        runtime.start()
        token = runtime.admin_token or cfg.admin_token_file.read_text().strip()
        http.start(runtime.app)
        if wait_mqtt and runtime.bridge is not None and not runtime.bridge.wait_connected(10):
            raise RuntimeError(f"the cloud's MQTT bridge did not connect to {cfg.mqtt_host}:{cfg.mqtt_port}")
    except BaseException:
        http.stop()
        runtime.stop()
        raise
    return CloudServer(
        base_url=http.base_url, admin_token=token, data_dir=cfg.data_dir, settings=cfg, runtime=runtime,
        mqtt_host=cfg.mqtt_host if mqtt else None, mqtt_port=cfg.mqtt_port if mqtt else None, _http=http,
    )


def target_of(cloud: CloudServer) -> str:
    """The cloud's agent channel as an agent's `[grpc] target` (the cloud started with `agent_channel_port`)."""
    assert cloud.runtime.agent_channel is not None, "started without agent_channel_port: no agent channel"
    return f"127.0.0.1:{cloud.runtime.agent_channel.port}"


def push_desired(cloud: CloudServer, device_id: str, raw: bytes, *, timeout_s: float = 10.0,
                 stream: Any = None) -> Any:
    """Send `raw` down `device_id`'s agent-channel stream as its desired state, as is: no signature, generation or
    device check on the cloud's side (a hostile or replayed push for the agent to refuse). Waits for the device's
    stream (one other than `stream`, if given: the stream before the agent restarted); returns the stream used."""
    from edgefleet.protos import agent_channel_pb2 as pb

    hub = cloud.runtime.agent_channel.hub

    def live() -> Any:
        s = hub.stream_of(device_id)
        return s if s is not None and s is not stream and not s.closed else None

    target = wait_for(live, timeout_s, what=f"{device_id}'s agent-channel stream")
    assert target.send(pb.CloudMessage(desired=raw)), f"the push to {device_id} was not taken by its stream"
    return target


def tiny_onnx(n_in: int = 4, n_out: int = 2) -> bytes:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n_in])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n_out])
    w = numpy_helper.from_array(np.arange(n_in * n_out, dtype=np.float32).reshape(n_in, n_out), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "tiny", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # loads in every ONNX Runtime in the field
    return model.SerializeToString()


def enroll_device(admin: httpx.Client, device_id: str, device_class: str = "rpi4",
                  labels: dict[str, str] | None = None) -> EnrollResponse:
    r = admin.post("/api/v1/enrollment-tokens", json={"note": f"test {device_id}"})
    assert r.status_code == 201, r.text
    token = r.json()["token"]
    r = admin.post("/api/v1/enroll", headers={"Authorization": f"Bearer {token}"},
                   json={"device_id": device_id, "device_class": device_class, "labels": labels or {}})
    assert r.status_code == 200, r.text
    return EnrollResponse.model_validate_json(r.content)


@contextmanager
def cloud_server(data_dir: Path, **kwargs: Any) -> Iterator[CloudServer]:
    server = start_cloud_server(data_dir, **kwargs)
    try:
        yield server
    finally:
        server.stop()


def mqtt_connack(host: str, port: int, *, client_id: str, username: str | None = None,
                 password: str | None = None, timeout_s: float = 10.0) -> Any:
    """Connect once (no retry), return the broker's CONNACK reason code, and disconnect."""
    got: list[Any] = []
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv311)
    if username is not None:
        client.username_pw_set(username, password)
    client.on_connect = lambda c, u, f, rc, p: got.append(rc)
    client.connect(host, port, keepalive=30)
    client.loop_start()
    try:
        wait_for(lambda: got, timeout_s, what=f"a CONNACK for {client_id}")
        return got[0]
    finally:
        client.disconnect()
        client.loop_stop()


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int


@dataclass
class MqttProbe:
    """A test's MQTT client: subscribes to `topics` and records every message, thread-safely."""

    host: str
    port: int
    topics: tuple[str, ...] = ()
    client_id: str = field(default_factory=lambda: "probe-" + uuid.uuid4().hex[:8])
    will: tuple[str, bytes] | None = None  # (topic, payload): retained QoS 1 last will
    messages: list[Received] = field(default_factory=list)
    username: str | None = None
    password: str | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                   protocol=mqtt.MQTTv311)
        if self.will:
            self._client.will_set(self.will[0], self.will[1], qos=1, retain=True)
        if self.username is not None:
            self._client.username_pw_set(self.username, self.password)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *a: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect(self.host, self.port, keepalive=30)
        self._client.loop_start()
        wait_for(self._client.is_connected, 10, what=f"probe {self.client_id} to connect")
        if self.topics:
            wait_for(self._subscribed.is_set, 10, what=f"probe {self.client_id} to subscribe")

    def _on_connect(self, client: mqtt.Client, *_: Any) -> None:
        if self.topics:
            client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain), msg.qos))

    def received(self, topic: str | None = None) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if topic is None or m.topic == topic]

    def wait_for(self, topic: str, predicate: Callable[[Received], bool] | None = None,
                 timeout_s: float = 10) -> Received:
        def found() -> Received | None:
            return next((m for m in self.received(topic) if predicate is None or predicate(m)), None)

        return wait_for(found, timeout_s, what=f"a message on {topic}")

    def publish(self, topic: str, payload: bytes | str, *, retain: bool = False, qos: int = 1) -> None:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(10)

    def drop(self) -> None:
        """Vanish without DISCONNECT (the broker then sends the last will): close the socket under paho."""
        sock = self._client.socket()
        self._client.loop_stop()
        if sock is not None:
            sock.close()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
