"""Not a benchmark (it has no --json; bench/transport.py is the benchmark): the processes bench/transport.py runs (a
Mosquitto of its own, the cloud, agents, telemetry senders) and their helpers. A sender is a child process
(`transport.py _sender SPEC.json`, `sender_main`) that plays enrolled devices through the agent's own outbox and
links."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PG_ADMIN_URL = os.environ.get("EDGEFLEET_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
TRANSPORTS = ("mqtt", "grpc")
MODEL = "bench-transport"
MAX_DRAIN_S = 180.0  # a sender gives up on its outboxes after this (a cloud that stopped acknowledging)
BROKER_CONF = """listener {port} 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 100000
max_inflight_messages 0
set_tcp_nodelay true
log_dest stderr
log_type error
log_type warning
"""
ACCEPTED = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .*accepted desired state generation (\d+) from (\w+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_s(pid: int) -> float:
    """utime + stime of a process from /proc, in seconds (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(f) for f in fields[11:13]) / os.sysconf("SC_CLK_TCK")


def wait_until(cond: Any, timeout_s: float, what: str, procs: Procs | None = None, interval_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if procs is not None:
            procs.check_alive()
        try:
            value = cond()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling until the bound
            last = exc
        time.sleep(interval_s)
    raise SystemExit(f"transport bench: timed out after {timeout_s:.0f} s waiting for {what}"
                     + (f" (last error: {last})" if last else ""))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Procs:
    """Every child, by name, stopped by its own PID (SIGTERM, then SIGKILL after 10 s), newest first."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "ab")
        kw.setdefault("stdout", log)
        proc = subprocess.Popen(argv, stderr=log, env={**os.environ, **(env or {})}, start_new_session=True, **kw)
        log.close()
        self.procs[name] = proc
        return proc

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.logdir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def check_alive(self, names: list[str] | None = None) -> None:
        for name in names or list(self.procs):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise SystemExit(f"transport bench: {name} exited with {proc.returncode}; last lines:\n"
                                 + self.log_tail(name))

    def stop(self, names: list[str]) -> None:
        procs = [(n, self.procs.pop(n)) for n in names if n in self.procs]
        for _, proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def stop_all(self) -> None:
        self.stop(list(reversed(list(self.procs))))


# -- the parts ------------------------------------------------------------------------------------------------------


def start_broker(procs: Procs, workdir: Path) -> int:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        raise SystemExit("transport bench: mosquitto is not installed (apt-get install mosquitto)")
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(BROKER_CONF.format(port=port))
    procs.start("mosquitto", [binary, "-c", str(conf)], stdout=subprocess.DEVNULL)

    def listening() -> bool:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True

    wait_until(listening, 10, f"mosquitto to listen on port {port}", procs)
    return port


def tiny_onnx() -> bytes:
    """A valid MatMul model, x: [1, 4] float32 -> y: [1, 2]: installs and smoke-tests in milliseconds."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    w = numpy_helper.from_array(np.arange(8, dtype=np.float32).reshape(4, 2), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "tiny", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def agent_config(work: Path, device_id: str, transport: str, cloud_url: str, token: str, grpc_target: str) -> Path:
    data = work / "agents" / device_id
    data.mkdir(parents=True)
    path = data / "agent.toml"
    path.write_text(
        f'device_id = "{device_id}"\ndevice_class = "x86-cpu"\ncloud_url = "{cloud_url}"\n'
        f'enrollment_token = "{token}"\ndata_dir = "{data}"\ntransport = "{transport}"\n\n'
        f'[labels]\ntransport = "{transport}"\n\n'
        '[api]\nhttp_host = "127.0.0.1"\nhttp_port = 0\nunix_socket = ""\n\n'
        # 60 s windows (the default): no telemetry of their own while the push is timed.
        "[telemetry]\nwindow_s = 60.0\n\n"
        "[retry]\nretry_initial_s = 0.5\nretry_max_s = 5.0\n"
        + (f'\n[grpc]\ntarget = "{grpc_target}"\n' if transport == "grpc" else "")
    )
    return path


class AgentLog:
    """An agent's log, read on from where the last look stopped: its acceptance lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def skip_to_end(self) -> None:
        self.offset = self.path.stat().st_size if self.path.exists() else 0
        self.partial = b""

    def accepted(self) -> list[tuple[float, int, str]]:
        """(unix time, generation, source) of acceptances logged since the last call."""
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        out = []
        for line in lines:
            m = ACCEPTED.match(line.decode(errors="replace"))
            if m:
                at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1000
                out.append((at, int(m.group(3)), m.group(4)))
        return out


# -- telemetry senders (child processes: `transport.py _sender SPEC.json`) -------------------------------------------


def sender_main(spec_path: Path) -> None:
    """N/senders devices of one transport, each its Outbox + LinkOrHttp + link, on a thread; see the docstring."""
    import logging

    from edgefleet.edge_agent.clock import SystemClock
    from edgefleet.edge_agent.cloud_client import CloudClient
    from edgefleet.edge_agent.fallback import LinkOrHttp
    from edgefleet.edge_agent.link_grpc import GrpcLink
    from edgefleet.edge_agent.link_mqtt import MqttLink
    from edgefleet.edge_agent.outbox import Outbox
    from edgefleet.edge_agent.state import StateStore
    from edgefleet.protos.messages import EnrollResponse, TelemetryWindow, parse_message

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = json.loads(spec_path.read_text())
    clock = SystemClock()
    now = clock.now()
    window = TelemetryWindow(model=MODEL, version=1, start=now - timedelta(seconds=1), end=now, count=100, errors=1,
                             rows=100, p50_ms=2.5, p95_ms=4.0, p99_ms=6.5, mean_ms=2.75, row_ms=2.75, mean_mj=12.5,
                             row_mj=12.5, energy_source="estimated", energy_meter="modelled",
                             energy_method="modelled")
    devices = []
    for data_dir in spec["data_dirs"]:
        data_dir = Path(data_dir)
        enrollment = parse_message(StateStore(data_dir / "state.json").state.enrollment, EnrollResponse)
        device_id = enrollment.device_id
        outbox_dir = Path(spec["outbox_root"]) / device_id
        shutil.rmtree(outbox_dir, ignore_errors=True)
        outbox = Outbox(outbox_dir, 64 * 1024 * 1024)
        for _ in range(spec["batches"]):
            outbox.add(device_id, [window] * spec["windows"], now)
        client = CloudClient(spec["cloud_url"], token=enrollment.device_token, timeout_s=5.0)
        http_posts = [0]
        post = client.post_telemetry

        def counted(batch: Any, _post: Any = post, _n: list[int] = http_posts) -> Any:
            _n[0] += 1
            return _post(batch)

        client.post_telemetry = counted  # type: ignore[method-assign]
        lio = LinkOrHttp(client, clock, ack_timeout_s=spec["ack_timeout_s"], desired_poll_s=3600.0)
        if spec["transport"] == "grpc":
            link: Any = GrpcLink(spec["grpc_target"], device_id, enrollment.device_token, on_desired=lambda raw: None,
                                 on_connected=lambda: None, retry_initial_s=0.2, retry_max_s=1.0)
        else:
            link = MqttLink(enrollment.broker, device_id, on_desired=lambda raw: None, on_connected=lambda: None,
                            retry_initial_s=0.2, retry_max_s=1.0)
        lio.link = link
        acks: list[float] = []
        ack = outbox.ack

        def timed_ack(seq: int, epoch: int | None = None, _ack: Any = ack, _acks: list[float] = acks) -> Any:
            _acks.append(time.time())
            return _ack(seq, epoch=epoch)

        outbox.ack = timed_ack  # type: ignore[method-assign]
        devices.append({"id": device_id, "outbox": outbox, "lio": lio, "link": link, "acks": acks,
                        "http": http_posts, "client": client, "drained_at": None})
        link.start()
    deadline = time.monotonic() + 30
    while not all(d["link"].connected for d in devices):
        if time.monotonic() > deadline:
            down = [d["id"] for d in devices if not d["link"].connected]
            print(json.dumps({"error": f"links not up within 30 s: {down}"}), flush=True)
            return
        time.sleep(0.02)
    if spec.get("nodelay") and spec["transport"] == "mqtt":
        for d in devices:  # diagnostic: the device side of the MQTT path without Nagle (paho leaves it on)
            d["link"]._client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    print("ready", flush=True)
    sys.stdin.readline()  # go
    start = time.time()
    stop_at = time.monotonic() + spec["max_s"]
    cpu0 = time.process_time()

    def drain(d: dict[str, Any]) -> None:
        while time.monotonic() < stop_at:
            d["lio"].send_outbox(d["outbox"])
            if not d["outbox"].pending():
                d["drained_at"] = time.time()
                return

    threads = [threading.Thread(target=drain, args=(d,), daemon=True) for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join(spec["max_s"] + 30)
    cpu = time.process_time() - cpu0
    result = {"start": start, "cpu_s": cpu,
              "devices": {d["id"]: {"acks": d["acks"], "http": d["http"][0], "drained_at": d["drained_at"],
                                    "left": len(d["outbox"].pending())} for d in devices}}
    print(json.dumps(result), flush=True)
    for d in devices:
        d["link"].stop()
        d["client"].close()
