"""MQTT against the gRPC agent channel (issue 11): push latency of a deploy, and acknowledged telemetry per second.

    .venv/bin/python bench/transport.py [--json] [--agents 20] [--deploys 10] [--backend sqlite|postgresql]
        [--batches 100] [--windows 10] [--senders 2] [--ingest-wait-s S] [--tcp-nodelay] [--keep]

Everything is real and on this machine. A Mosquitto of our own (free port, own config, anonymous: the cloud runs
with `mqtt_auth = "none"`, no device logins), stopped by its PID. A real `edgefleet-cloud serve` process: MQTT to
that broker (`embedded_broker = "never"`), the gRPC agent channel on `--agent-channel-port`, and a database of its
own: a SQLite file in its data dir (the default here) or a fresh PostgreSQL database, dropped afterwards
(`--backend postgresql`, admin URL from EDGEFLEET_BENCH_PG). `--agents` N real `edgefleet-agent run` processes per
transport (2N in all, each in its own data dir; label `transport=mqtt|grpc`, class x86-cpu), enrolled with an
enrollment token made through the admin API. Every child is stopped by its PID on exit, failure and Ctrl-C.

Push latency. A tiny ONNX model is pushed and deployed to each transport's label, and the bench waits until every
agent runs it (the only bundle download). Then `--deploys` times, per transport in turn (MQTT, then gRPC, so both
see the same load): one admin REST call `POST /api/v1/deployments` re-deploys the same version to that label with
a new `p95_ms` budget (`fleet deploy --p95-ms`), which gives each of the N devices a new signed desired state
(a new generation) and no new bundle. The figure per (agent, deploy) is from just before that REST call to the
agent's own log line `accepted desired state generation G from mqtt|grpc`: the moment the agent verified the
document (signature, generation, expiry, device, class) and saved it as accepted. The agents log with
millisecond timestamps on the same clock as the bench. It includes the cloud signing and storing every device's
document one after another inside the REST call (the deploy's own duration is in `deploy_call_ms`), so the
N-th agent waits for N signatures; it is not the wire alone. An acceptance that came over HTTP (a reconnect's
fetch) instead of the link is counted in `accepted_via` and still timed.

Acknowledged telemetry. The real agents are then stopped (SIGTERM) and `--senders` processes per transport take
over the same N enrolled identities (device token and broker from each agent's state.json) with the agent's own
telemetry path: its disk `Outbox`, `LinkOrHttp.send_outbox` (oldest first, ONE batch in flight per device: the
next leaves only once the cloud acknowledged the last) and the real `MqttLink` or `GrpcLink`. A real agent only
makes a batch per telemetry window, far too few to load the cloud, hence the senders. Each device's outbox is
filled with `--batches` batches of `--windows` windows before the start, all devices wait until every link is up,
then drain together. An acknowledgement here is what lets the outbox drop a batch: MQTT, the cloud's
TelemetryAck on the device's ack topic after its commit; gRPC, the TelemetryAck on the stream after its commit.
`telemetry_acked_per_s` counts BATCHES acknowledged per second while all N devices were still sending (from the
start to the first device whose outbox ran dry); `telemetry_detail` has windows/s (batches x
`--windows`), the totals, and batches that fell back to HTTP (a link ack not within `link.ack_timeout_s`, 5 s:
should be 0). Both cloud ingest paths gather batches for up to `mqtt_ingest_wait_s` (default 0.05 s) before one
transaction; with one batch in flight per device that wait, not the transport, bounds what N devices can send
(about N batches per 50 ms). `--ingest-wait-s 0` runs the cloud without it, to compare the transports themselves.

Other keys: `agents` (N per transport), `machine` (cores, load average before and after, platform), `cpu_s` of the
cloud and broker per phase, `backend`. On a machine where 2N agents do not fit, pass a smaller `--agents`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _transport_parts import (
    BIN,
    MAX_DRAIN_S,
    MODEL,
    PG_ADMIN_URL,
    TRANSPORTS,
    AgentLog,
    Procs,
    agent_config,
    cpu_s,
    free_port,
    percentile,
    sender_main,
    start_broker,
    tiny_onnx,
    wait_until,
)

# -- the bench (this process) ---------------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_sender":
        sender_main(Path(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=20, help="real agent processes PER TRANSPORT (default 20)")
    parser.add_argument("--deploys", type=int, default=10, help="budget re-deploys timed per transport (default 10)")
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite",
                        help="the cloud's database (default sqlite, the cloud's own default)")
    parser.add_argument("--batches", type=int, default=100, help="telemetry batches queued per device (100)")
    parser.add_argument("--windows", type=int, default=10, help="windows per telemetry batch (10)")
    parser.add_argument("--senders", type=int, default=2, help="sender processes per transport (2)")
    parser.add_argument("--ingest-wait-s", type=float, default=None,
                        help="the cloud's mqtt_ingest_wait_s (both ingest paths); default: the product's, 0.05")
    parser.add_argument("--tcp-nodelay", action="store_true",
                        help="diagnostic: TCP_NODELAY on the MQTT senders' sockets (paho and the agent leave Nagle on)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) and say where")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = parser.parse_args()
    if args.agents < 1 or args.deploys < 1 or args.senders < 1 or args.batches < 1:
        parser.error("--agents, --deploys, --senders and --batches must be at least 1")

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(f"transport bench: stopped by signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-transport-"))
    (work / "logs").mkdir()
    procs = Procs(work / "logs")
    db_name = None
    load0 = os.getloadavg()
    t_start = time.monotonic()
    try:
        if args.backend == "postgresql":
            import psycopg

            db_name = "edgefleet_bench_" + uuid.uuid4().hex[:12]
            with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'CREATE DATABASE "{db_name}"')
            db_url = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + "/" + db_name
        else:
            db_url = f"sqlite:///{work / 'cloud' / 'edgefleet.db'}"
        result = run(args, work, procs, db_url)
        result["machine"] = {"cores": os.cpu_count(), "load_before": [round(x, 2) for x in load0],
                             "load_after": [round(x, 2) for x in os.getloadavg()], "platform": platform.machine(),
                             "python": platform.python_version()}
        result["wall_s"] = round(time.monotonic() - t_start, 1)
    finally:
        procs.stop_all()
        if db_name is not None:
            import psycopg

            with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        if args.keep:
            print(f"transport bench: kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))


def progress(msg: str) -> None:
    print(f"transport bench: {msg}", file=sys.stderr, flush=True)


def run(args: Any, work: Path, procs: Procs, db_url: str) -> dict[str, Any]:
    import httpx

    from edgefleet.fleet.client import FleetClient
    from edgefleet.protos.api import DeployRequest, EnrollmentTokenRequest

    n = args.agents
    mqtt_port = start_broker(procs, work)
    port, channel_port = free_port(), free_port()
    cloud_url = f"http://127.0.0.1:{port}"
    env = {"EDGEFLEET_MQTT_HOST": "127.0.0.1", "EDGEFLEET_MQTT_PORT": str(mqtt_port),
           "EDGEFLEET_EMBEDDED_BROKER": "never", "EDGEFLEET_MQTT_AUTH": "none", "EDGEFLEET_PUBLIC_URL": cloud_url,
           "EDGEFLEET_DATABASE_URL": db_url, "EDGEFLEET_MQTT_RETRY_INITIAL_S": "0.2",
           "EDGEFLEET_MQTT_RETRY_MAX_S": "2.0"}
    if args.ingest_wait_s is not None:
        env["EDGEFLEET_MQTT_INGEST_WAIT_S"] = str(args.ingest_wait_s)
    progress(f"broker on {mqtt_port}; starting edgefleet-cloud serve ({args.backend}), agent channel {channel_port}")
    cloud = procs.start("cloud", [str(BIN / "edgefleet-cloud"), "serve", "--host", "127.0.0.1", "--port", str(port),
                                  "--data-dir", str(work / "cloud"), "--agent-channel-port", str(channel_port),
                                  "--log-level", "warning"], env=env)
    token_file = work / "cloud" / "admin.token"
    wait_until(lambda: httpx.get(f"{cloud_url}/healthz", timeout=1).status_code == 200 and token_file.exists(), 60,
               "the cloud to answer /healthz", procs)
    client = FleetClient(cloud_url, token_file.read_text().strip())
    enroll = client.create_enrollment_token(EnrollmentTokenRequest(note="bench/transport.py"))
    ids = {t: [f"{t}-{i:03d}" for i in range(n)] for t in TRANSPORTS}
    logs: dict[str, AgentLog] = {}
    t0 = time.monotonic()
    for i in range(n):  # interleaved, so neither transport's agents all start first
        for t in TRANSPORTS:
            device_id = ids[t][i]
            cfg = agent_config(work, device_id, t, cloud_url, enroll.token, f"127.0.0.1:{channel_port}")
            procs.start(device_id, [str(BIN / "edgefleet-agent"), "run", "--config", str(cfg)],
                        env={"PYTHONUNBUFFERED": "1"})
            logs[device_id] = AgentLog(work / "logs" / f"{device_id}.log")
    all_ids = [d for t in TRANSPORTS for d in ids[t]]

    def all_online() -> bool:
        devices = {d.device_id: d for d in client.list_devices()}
        return all(d in devices and devices[d].online for d in all_ids)

    wait_until(all_online, 60 + 3 * n, f"{2 * n} agents to enroll and come online", procs, 0.5)
    startup_s = time.monotonic() - t0
    progress(f"{2 * n} agents online in {startup_s:.1f} s; pushing the model and deploying it")
    version = client.push_model(MODEL, tiny_onnx()).version
    for t in TRANSPORTS:
        client.deploy(DeployRequest(model=MODEL, version=version, label=f"transport={t}"))

    def in_sync() -> bool:
        rows = client.status()
        return len(rows) == 2 * n and all(r.state == "in_sync" and r.active_version == version for r in rows)

    wait_until(in_sync, 60 + 2 * n, "every agent to install and activate the model", procs, 0.5)

    # -- push latency -----------------------------------------------------------------------------------------------
    latencies: dict[str, list[float]] = {t: [] for t in TRANSPORTS}
    call_ms: dict[str, list[float]] = {t: [] for t in TRANSPORTS}
    via: dict[str, dict[str, int]] = {t: {} for t in TRANSPORTS}
    cpu0 = {"cloud": cpu_s(cloud.pid), "broker": cpu_s(procs.procs["mosquitto"].pid)}
    for k in range(args.deploys + 1):  # deploy 0 is a warm-up, not counted
        for t in TRANSPORTS:
            for d in ids[t]:
                logs[d].skip_to_end()
            before = time.time()
            client.deploy(DeployRequest(model=MODEL, version=version, label=f"transport={t}", p95_ms=100.0 + k))
            after = time.time()
            seen: dict[str, tuple[float, int, str]] = {}

            def all_accepted() -> bool:
                for d in ids[t]:  # noqa: B023
                    if d not in seen:  # noqa: B023
                        got = logs[d].accepted()
                        if got:
                            seen[d] = got[0]  # noqa: B023
                return len(seen) == n  # noqa: B023

            wait_until(all_accepted, 30, f"deploy {k}: every {t} agent to accept its new desired state", procs, 0.005)
            if k == 0:
                continue
            call_ms[t].append((after - before) * 1000)
            for at, _, source in seen.values():
                latencies[t].append((at - before) * 1000)
                via[t][source] = via[t].get(source, 0) + 1
    push_cpu = {"cloud": round(cpu_s(cloud.pid) - cpu0["cloud"], 2),
                "broker": round(cpu_s(procs.procs["mosquitto"].pid) - cpu0["broker"], 2)}
    progress("push latency done; stopping the agents for the telemetry senders")

    # -- acknowledged telemetry -------------------------------------------------------------------------------------
    procs.stop(all_ids)
    telemetry: dict[str, Any] = {}
    for t in TRANSPORTS:
        telemetry[t] = run_senders(args, work, procs, t, [work / "agents" / d for d in ids[t]], cloud_url,
                                   f"127.0.0.1:{channel_port}", cloud.pid)
        progress(f"{t} telemetry: {telemetry[t]['acked_batches_per_s']} batches/s acknowledged")
    client.close()

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v, 1)

    return {
        "push_latency_ms": {f"{t}_{q}": ms(percentile(latencies[t], p)) for t in TRANSPORTS
                            for q, p in (("p50", 0.5), ("p99", 0.99))},
        "telemetry_acked_per_s": {t: telemetry[t]["acked_batches_per_s"] for t in TRANSPORTS},
        "agents": n,
        "push_detail": {
            "pairs": {t: len(latencies[t]) for t in TRANSPORTS}, "deploys": args.deploys,
            "max_ms": {t: ms(max(latencies[t])) for t in TRANSPORTS},
            "min_ms": {t: ms(min(latencies[t])) for t in TRANSPORTS},
            "deploy_call_ms_p50": {t: ms(percentile(call_ms[t], 0.5)) for t in TRANSPORTS},
            "accepted_via": via, "cpu_s": push_cpu,
            "method": "admin REST deploy (same version, new p95_ms budget) to the transport's label -> each agent's "
                      "log line 'accepted desired state generation G from <link>' (ms timestamps)",
        },
        "telemetry_detail": {
            **{t: {k: v for k, v in telemetry[t].items() if k != "acked_batches_per_s"} for t in TRANSPORTS},
            "unit": "batches acknowledged per second (windows_per_s: x windows per batch)",
            "windows_per_batch": args.windows, "batches_per_device": args.batches, "senders": args.senders,
            "ingest_wait_s": args.ingest_wait_s if args.ingest_wait_s is not None else 0.05,
            "method": "real Outbox + LinkOrHttp.send_outbox + MqttLink/GrpcLink per enrolled device, one batch in "
                      "flight per device, all devices started together",
        },
        "backend": args.backend, "agent_startup_s": round(startup_s, 1),
    }


def run_senders(args: Any, work: Path, procs: Procs, transport: str, data_dirs: list[Path], cloud_url: str,
                grpc_target: str, cloud_pid: int) -> dict[str, Any]:
    names = []
    for i in range(args.senders):
        chunk = data_dirs[i::args.senders]
        if not chunk:
            continue
        spec = work / f"sender-{transport}-{i}.json"
        spec.write_text(json.dumps({"transport": transport, "data_dirs": [str(d) for d in chunk],
                                    "outbox_root": str(work / "outboxes"), "batches": args.batches,
                                    "windows": args.windows, "max_s": MAX_DRAIN_S, "cloud_url": cloud_url,
                                    "grpc_target": grpc_target, "ack_timeout_s": 5.0,
                                    "nodelay": args.tcp_nodelay}))
        name = f"sender-{transport}-{i}"
        procs.start(name, [sys.executable, str(Path(__file__).resolve()), "_sender", str(spec)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        names.append(name)

    def read_line(name: str, timeout_s: float) -> str:
        proc = procs.procs[name]
        ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
        if not ready:
            raise SystemExit(f"transport bench: {name} said nothing within {timeout_s:.0f} s; last lines:\n"
                             + procs.log_tail(name))
        line = proc.stdout.readline().decode()
        if not line:
            raise SystemExit(f"transport bench: {name} exited ({proc.poll()}); last lines:\n" + procs.log_tail(name))
        return line.strip()

    for name in names:
        line = read_line(name, 120)
        if line != "ready":
            raise SystemExit(f"transport bench: {name}: {line}")
    cloud_cpu0 = cpu_s(cloud_pid)
    broker_cpu0 = cpu_s(procs.procs["mosquitto"].pid)
    for name in names:
        procs.procs[name].stdin.write(b"go\n")
        procs.procs[name].stdin.flush()
    results = [json.loads(read_line(name, MAX_DRAIN_S + 60)) for name in names]
    cloud_cpu = cpu_s(cloud_pid) - cloud_cpu0
    broker_cpu = cpu_s(procs.procs["mosquitto"].pid) - broker_cpu0
    procs.stop(names)
    devices = {k: v for r in results for k, v in r["devices"].items()}
    start = min(r["start"] for r in results)
    drained = [d["drained_at"] for d in devices.values() if d["drained_at"] is not None]
    # While every device was still sending: to the first outbox that ran dry, or the end.
    cut = min(drained) if drained else max((a for d in devices.values() for a in d["acks"]), default=start)
    acks = [a for d in devices.values() for a in d["acks"]]
    steady = sum(1 for a in acks if a <= cut)
    span = max(cut - start, 1e-9)
    last = max(acks) if acks else start
    return {
        "acked_batches_per_s": round(steady / span),
        "windows_per_s": round(steady * args.windows / span),
        "steady_s": round(span, 2), "acked_steady": steady, "acked_total": len(acks),
        "overall_batches_per_s": round(len(acks) / max(last - start, 1e-9)),
        "devices_drained": len(drained), "left_in_outboxes": sum(d["left"] for d in devices.values()),
        "http_fallbacks": sum(d["http"] for d in devices.values()),
        "cpu_s": {"cloud": round(cloud_cpu, 2), "broker": round(broker_cpu, 2),
                  "senders": round(sum(r["cpu_s"] for r in results), 2)},
    }


if __name__ == "__main__":
    main()
