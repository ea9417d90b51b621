"""Telemetry ingest at fleet scale: simulated devices -> a real Mosquitto -> the cloud's MqttBridge -> the database.

    .venv/bin/python bench/telemetry.py [--backend postgresql|sqlite] [--devices 200] [--windows 50]
        [--rate 100000] [--seconds 10] [--publishers 2] [--json] [--profile]

Theory: a broker of our own (own port, own config with the queue and in-flight limits raised so nothing is dropped
for a slow cloud) and a database of our own (a fresh PostgreSQL database, dropped afterwards, or a SQLite file).
Publisher processes, forked before the cloud starts any thread, play `--devices` devices: each sends TelemetryBatch
messages of `--windows` windows at QoS 1 on the device's own telemetry topic, paced together to offer `--rate`
records (windows) per second for `--seconds`, and listens on the device's ack topic. The cloud is the product's own
path: the real `MqttBridge` (parse, one `Fleet.record_telemetry_many` per group, manual acks after the commit,
then a TelemetryAck per device) on a real `Fleet` and `Store`.

A record's age is from its batch's publish to the arrival of the TelemetryAck that names it: what an agent waits
before it may drain its outbox. `records_per_s` is what was stored over the time from the first publish to the last
ack; `sent` counts what the publishers sent, `stored` the windows in the database at the end (they must be equal).
CPU shares are CPU seconds over that wall time, per part: the cloud process, the broker, the PostgreSQL backends
of our database, the publishers. `parse_s` and `store_s` split the cloud's ingest: `check` (JSON and the contract,
in the checking thread) against `record_telemetry_many` (to dicts, the SQL, in the storing thread; the two overlap).
`--profile` adds each thread's top functions (cProfile) on stderr.

Offered load above capacity shows as a falling `records_per_s` against `offered_per_s` and a growing age; the
machine's core count is printed with the figures, as every part shares it.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import multiprocessing as mp
import os
import platform
import pstats
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

PG_ADMIN_URL = os.environ.get("EDGEFLEET_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
PREFIX = "edgefleet"
# Mosquitto's defaults (1,000 queued, 20 in flight per client) drop what a cloud a few seconds behind has not taken
# yet (issue 9: 74-98% of a flood lost); the bench measures the cloud, not those limits.
BROKER_CONF = """listener {port} 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 10000000
max_queued_bytes 0
max_inflight_messages 0
max_inflight_bytes 0
log_dest stderr
log_type error
log_type warning
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_s(pid: int) -> float:
    """utime + stime of a process (and its reaped children) from /proc, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def start_broker(workdir: Path) -> tuple[subprocess.Popen, int]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        raise SystemExit("mosquitto is not installed: apt-get install mosquitto")
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(BROKER_CONF.format(port=port))
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=open(workdir / "mosquitto.log", "ab"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"mosquitto did not listen on port {port} within 10 s; see {workdir / 'mosquitto.log'}")


# -- publishers (child processes) -----------------------------------------------------------------------------------


def window_json(now: datetime, windows: int) -> str:
    from edgefleet.protos.messages import TelemetryWindow

    w = TelemetryWindow(model="bench-model", version=1, start=now - timedelta(seconds=10), end=now, count=100,
                        errors=1, rows=400, p50_ms=2.5, p95_ms=4.0, p99_ms=6.5, mean_ms=2.75, row_ms=0.7,
                        mean_mj=12.5, row_mj=3.1, energy_source="measured", energy_meter="rapl",
                        energy_method="counter", row_net_mj=1.2, idle_w=3.5)
    return "[" + ",".join([w.model_dump_json()] * windows) + "]"


def publisher(index: int, port: int, devices: list[str], windows: int, msgs_per_s: float, seconds: float,
              go: Any, results: Any) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    body = window_json(datetime.now(timezone.utc), windows)
    sent: dict[tuple[str, int], float] = {}
    ages: list[float] = []
    acked = [0, 0.0]  # batches, time of the last ack
    lock = threading.Lock()

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        at = time.time()
        ack = json.loads(msg.payload)
        with lock:
            for seq in ack["seqs"]:
                t = sent.pop((ack["device_id"], seq), None)
                if t is not None:
                    ages.append(at - t)
                    acked[0] += 1
                    acked[1] = at

    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{index}",
                         protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.on_message = on_message
    client.connect("127.0.0.1", port, keepalive=60)
    client.subscribe([(f"{PREFIX}/devices/{d}/ack", 1) for d in devices])
    client.loop_start()
    results.put(("ready", index))
    go.wait()
    epoch = int(time.time() * 1000)
    start = time.time()
    n = 0
    total = int(msgs_per_s * seconds)
    cpu0 = time.process_time()
    while n < total:
        due = min(total, int((time.time() - start) * msgs_per_s) + 1)
        while n < due:
            device = devices[n % len(devices)]
            seq = n // len(devices)
            payload = (f'{{"kind":"telemetry","schema_version":1,"device_id":"{device}","epoch":{epoch},'
                       f'"seq":{seq},"windows":{body},"dropped_windows":0,"merged_windows":0,'
                       f'"sent_at":"{datetime.now(timezone.utc).isoformat()}"}}').encode()
            with lock:
                sent[(device, seq)] = time.time()
            client.publish(f"{PREFIX}/devices/{device}/telemetry", payload, qos=1)
            n += 1
        time.sleep(max(0.0, start + n / msgs_per_s - time.time()))
    end_send = time.time()
    # Drain: every batch acknowledged, or 120 s of no progress.
    last, idle_since = -1, time.time()
    while time.time() - idle_since < 120:
        with lock:
            done = acked[0]
        if done >= n:
            break
        if done != last:
            last, idle_since = done, time.time()
        time.sleep(0.05)
    cpu = time.process_time() - cpu0
    client.loop_stop()
    client.disconnect()
    with lock:
        results.put(("done", index, {"sent": n, "acked": acked[0], "start": start, "end_send": end_send,
                                     "last_ack": acked[1], "ages": ages, "cpu_s": cpu}))


# -- the cloud (this process) ---------------------------------------------------------------------------------------


class Timed:
    """Wall time and calls of a callable, summed (the ingest thread is one thread: no lock needed)."""

    def __init__(self, call: Any, profile: cProfile.Profile | None = None) -> None:
        self.call, self.profile, self.s, self.n = call, profile, 0.0, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return self.call(*args, **kwargs)
        finally:
            self.s += time.perf_counter() - t
            self.n += 1


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--windows", type=int, default=50, help="windows (records) per MQTT message, at most 200")
    parser.add_argument("--rate", type=float, default=100_000, help="records per second offered, all publishers")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--ingest-batch", type=int, default=500, help="the bridge's messages per transaction")
    parser.add_argument("--profile", action="store_true", help="cProfile of the ingest thread, on stderr")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-bench-telemetry-"))
    broker, port = start_broker(workdir)
    devices = [f"bench-dev-{i:05d}" for i in range(args.devices)]
    msgs_per_s = args.rate / args.windows / args.publishers
    ctx = mp.get_context("fork")  # before this process starts any thread
    go, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=publisher, args=(i, port, devices[i::args.publishers], args.windows, msgs_per_s,
                                                 args.seconds, go, results), daemon=True)
             for i in range(args.publishers)]
    for p in procs:
        p.start()
    db_name = None
    try:
        for _ in procs:
            results.get(timeout=30)
        if args.backend == "postgresql":
            import psycopg

            db_name = "edgefleet_bench_" + uuid.uuid4().hex[:12]
            with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'CREATE DATABASE "{db_name}"')
            url = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + "/" + db_name
        else:
            url = f"sqlite:///{workdir / 'bench.db'}"
        result = run_cloud(args, url, port, devices, procs, go, results, broker)
        result.update({"backend": args.backend, "devices": args.devices, "windows_per_message": args.windows,
                       "offered_per_s": args.rate, "seconds": args.seconds, "publishers": args.publishers,
                       "cores": os.cpu_count(), "machine": platform.machine(),
                       "python": platform.python_version()})
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        broker.terminate()
        broker.wait(5)
        if db_name is not None:
            import psycopg

            with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:>28}: {value}")


def run_cloud(args: Any, url: str, port: int, devices: list[str], procs: list[Any], go: Any, results: Any,
              broker: subprocess.Popen) -> dict[str, Any]:
    from sqlalchemy import text

    from edgefleet.cloud.mqtt_bridge import MqttBridge
    from edgefleet.cloud.services import Fleet
    from edgefleet.cloud.settings import Settings
    from edgefleet.cloud.store import Store

    settings = Settings(data_dir=Path(url.rsplit("/", 1)[0].removeprefix("sqlite:///") or "."),
                        database_url=url, telemetry_device_windows_per_s=1e9)
    store = Store.open(url)
    now = datetime.now(timezone.utc)
    for i, device_id in enumerate(devices):
        store.enroll_device(device_id, "x86-cpu", {}, "bench", f"{i:064x}", now)
    # The ingest path needs only the settings and the store; blobs, TUF and signing play no part in it.
    fleet = Fleet(settings, store, blobs=None, tuf=None, signer=None, catalog={})  # type: ignore[arg-type]
    bridge = MqttBridge(fleet, "127.0.0.1", port, PREFIX, client_id="bench-cloud", republish_on_connect=False,
                        receive_maximum=65535, ingest_batch=args.ingest_batch)
    # One profiler per ingest thread: the checking one (parse) and the storing one (SQL, acks).
    profiles = {"check": cProfile.Profile(), "store": cProfile.Profile()} if args.profile else {}
    bridge.check = Timed(bridge.check)  # type: ignore[method-assign]
    fleet.record_telemetry_many = Timed(fleet.record_telemetry_many)  # type: ignore[method-assign]
    def profiled(call: Any, profile: cProfile.Profile) -> Any:
        def run(*a: Any) -> Any:
            profile.enable()
            try:
                return call(*a)
            finally:
                profile.disable()
        return run

    for name, attr in (("check", "_check_group"), ("store", "_store_group")):
        if name in profiles:
            setattr(bridge, attr, profiled(getattr(bridge, attr), profiles[name]))
    bridge.start()
    if not bridge.wait_connected(15):
        raise SystemExit(f"the bridge did not connect to the bench broker on port {port} within 15 s")
    pg_pids: list[int] = []
    pg_cpu0 = 0.0
    if args.backend == "postgresql":
        store.add_telemetry_many([], now)  # opens the pooled connection the ingest thread will use
        with store.engine.connect() as conn:
            pg_pids = [r[0] for r in conn.execute(text(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"))]
        pg_cpu0 = sum(cpu_s(p) for p in pg_pids)
    cloud_cpu0, broker_cpu0 = time.process_time(), cpu_s(broker.pid)
    go.set()
    done = []
    while len(done) < len(procs):
        kind, *rest = results.get(timeout=args.seconds + 600)
        if kind == "done":
            done.append(rest[1])
    cloud_cpu, broker_cpu = time.process_time() - cloud_cpu0, cpu_s(broker.pid) - broker_cpu0
    pg_cpu = 0.0
    if pg_pids:
        alive = [p for p in pg_pids if Path(f"/proc/{p}").exists()]
        pg_cpu = sum(cpu_s(p) for p in alive) - pg_cpu0
    bridge.stop()
    with store.engine.connect() as conn:
        stored = conn.execute(text("SELECT count(*) FROM telemetry_windows")).scalar_one()
    counters = store.counters()
    store.close()
    start = min(d["start"] for d in done)
    end = max(d["last_ack"] or d["end_send"] for d in done)
    wall = max(end - start, 1e-9)
    ages = [a for d in done for a in d["ages"]]
    sent = sum(d["sent"] for d in done) * args.windows
    out: dict[str, Any] = {
        "records_per_s": round(stored / wall), "sent": sent, "stored": int(stored),
        "p99_age_s": _round(percentile(ages, 0.99)), "p50_age_s": _round(percentile(ages, 0.50)),
        "max_age_s": _round(max(ages) if ages else None),
        "messages_per_s": round(sum(d["sent"] for d in done) / wall), "acked_messages": sum(d["acked"] for d in done),
        "wall_s": round(wall, 3), "send_s": round(max(d["end_send"] for d in done) - start, 3),
        "cpu_share": {"cloud": round(cloud_cpu / wall, 3), "broker": round(broker_cpu / wall, 3),
                      "postgresql": round(pg_cpu / wall, 3) if pg_pids else None,
                      "publishers": round(sum(d["cpu_s"] for d in done) / wall, 3)},
        "ingest_thread_s": {"parse": round(bridge.check.s, 3), "store": round(fleet.record_telemetry_many.s, 3),
                            "transactions": fleet.record_telemetry_many.n},
        "us_per_record": {"parse": round(1e6 * bridge.check.s / max(stored, 1), 2),
                          "store": round(1e6 * fleet.record_telemetry_many.s / max(stored, 1), 2)},
        "counters": {k: v for k, v in counters.items()
                     if k.startswith(("telemetry", "refused", "ingest", "malformed"))},
    }
    for name, profile in profiles.items():
        buf = io.StringIO()
        pstats.Stats(profile, stream=buf).sort_stats("tottime").print_stats(25)
        print(f"-- the {name} thread --\n{buf.getvalue()}", file=sys.stderr)
    return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


if __name__ == "__main__":
    main()
