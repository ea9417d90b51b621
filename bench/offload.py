"""Offload, end to end: what the SDK adds over a bare `session.run`, the agent's memory, the cloud's inference
servers, MLServer, the offload policy and the cascade. One JSON object with every section.

    .venv/bin/python bench/offload.py --json [--runs 5000] [--seconds 3] [--only sdk,cloud,grpc,mlserver,policy]

`sdk_overhead_us` (this file): the digits MLP (64-128-64-10 float, tests/sdk/kit.py), single-sample requests,
median (p50) or 99th percentile of `--runs` timed calls after a warm-up, each minus the median of a bare
`onnxruntime.InferenceSession.run` on the same model in this process:

  embedded_p50     Client.standalone(model).infer, no cloud: the SDK's own cost in the app's process
  unix_p50/p99     Client(socket).infer against a real agent process (`edgefleet-agent run`, its cloud
                   unreachable, so it serves what it has) over its unix socket, the framed protocol
  http_binary_p50  the same agent, OIP REST with the binary tensor extension, keep-alive http.client over TCP

`sdk_detail.service_bookkeeping_us`: InferenceService.run (modelled meter, telemetry windows) minus the runtime's
own run, in this process, p50: the metering and telemetry cost of every local request.

`agent_rss_mb`: that agent process's resident memory (VmRSS, /proc) after serving those requests, one model
loaded. `sdk_detail` has its peak (`agent_vmhwm_mb`) and the same figure for a bare python + onnxruntime + the model
(`bare_ort_process_rss_mb`).

The other sections come from their own scripts (bench/offload_cloud.py, offload_grpc.py, offload_mlserver.py,
offload_policy.py); a script that is missing or fails leaves a note in its section instead of stopping the run.
Every figure depends on the machine and its load: the JSON says which machine, cores and load average.

`sdk_detail` also has `bare_c_session_run_p50_us` (ONNX Runtime's C session under its Python wrapper, which the
agent and the embedded SDK call: common/ort_direct.py) with `embedded_over_c_session_p50_us`, the SDK's own work;
`unix_echo_floor_us` {same_core, two_cores}, two bare Python processes exchanging 300 and 100 bytes over a unix
socket, pinned (the floor under any unix-socket API here); `unix_p50_same_core_us`, the unix path with the agent's
threads and this process on one core. `--agent-python` runs the agent from another interpreter: a lean
`.[agent]` venv gives the device's memory figure (the dev venv's httpx also loads its CLI's click, rich, pygments).

Figures and how to read them: bench/README.md (2026-12-03, load ~0.6: embedded_p50 0.16-0.22 us, unix_p50
116-128 us, on one core 66-69 us in all against an echo floor of 4 us on one core and 53-59 on two; agent_rss_mb
98-99 in a lean venv).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from edgefleet.common import oip_codec  # noqa: E402
from edgefleet.sdk import Client  # noqa: E402
from tests.sdk import kit  # noqa: E402

SECTIONS = ("sdk", "cloud", "grpc", "mlserver", "policy")


def timed(fn, runs: int, warmup: int = 500) -> list[float]:
    """Per-call latencies in microseconds, sorted."""
    for _ in range(warmup):
        fn()
    samples = []
    perf = time.perf_counter
    for _ in range(runs):
        t0 = perf()
        fn()
        samples.append((perf() - t0) * 1e6)
    samples.sort()
    return samples


def p50(samples: list[float]) -> float:
    return statistics.median(samples)


def p99(samples: list[float]) -> float:
    return samples[min(len(samples) - 1, int(0.99 * len(samples)))]


def _rss_mb(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout_s} s")
        time.sleep(0.05)


def start_agent(work: Path, python: str) -> tuple[subprocess.Popen, dict[str, Any]]:
    """A real agent process (run by `python`) serving the digits model, its cloud unreachable; (process, its
    api.json)."""
    data = work / "data"
    kit.install_digits(data / "models", tmp=work)
    config = work / "agent.toml"
    config.write_text(f'device_id = "bench-1"\ndevice_class = "x86-cpu"\ncloud_url = "http://127.0.0.1:9"\n'
                      f'enrollment_token = "tok"\ndata_dir = "{data}"\n[api]\nhttp_port = 0\n'
                      f'unix_socket = "{work / "api.sock"}"\n')
    proc = subprocess.Popen([python, "-m", "edgefleet.edge_agent.main", "--log-level", "WARNING", "run",
                             "--config", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    api_json = data / "api.json"
    try:
        _wait(lambda: api_json.exists() or proc.poll() is not None, 60, "the agent wrote api.json")
        if proc.poll() is not None:
            raise RuntimeError(f"the agent exited: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
    except BaseException:
        proc.kill()
        raise
    return proc, json.loads(api_json.read_text())


def bare_rss_mb(model_path: Path) -> float:
    """python + numpy + onnxruntime + this model loaded and run once: the floor under any agent."""
    code = ("import onnxruntime as ort, numpy as np\n"
            f"s = ort.InferenceSession({str(model_path)!r}, providers=['CPUExecutionProvider'])\n"
            "s.run(None, {'input': np.zeros((1, 64), np.float32)})\n"
            "print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return int(out.stdout.strip()) / 1024


def unix_echo_floor_us(runs: int, cpus: tuple[int, int]) -> float:
    """The floor under any unix-socket API here: p50 of a 300-byte request and a 100-byte reply between two Python
    processes doing nothing else (a forked echo server), the client pinned to cpus[0] and the server to cpus[1].
    Measured here: about 4 us on one core (a direct switch), about 50 on two (a wake-up on the other core, twice),
    so where the scheduler puts an app and the agent moves the unix figure by tens of microseconds."""
    import socket

    work = Path(tempfile.mkdtemp(prefix="edgefleet-echo-"))
    path = str(work / "echo.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    before = os.sched_getaffinity(0)
    pid = os.fork()
    if pid == 0:  # the child: echo until the parent closes
        os.sched_setaffinity(0, {cpus[1]})
        conn, _ = server.accept()
        while conn.recv(65536):
            conn.sendall(b"r" * 100)
        os._exit(0)
    server.close()
    os.sched_setaffinity(0, {cpus[0]})
    client = socket.socket(socket.AF_UNIX)
    client.connect(path)
    message = b"q" * 300

    def once() -> None:
        client.sendall(message)
        client.recv(65536)

    try:
        samples = timed(once, runs)
    finally:
        client.close()
        os.waitpid(pid, 0)
        os.sched_setaffinity(0, before)
    return round(p50(samples), 2)


def _on_one_core(pid: int, measure: Any) -> Any:
    """`measure()` with this process and every thread of process `pid` on one core; affinities restored after."""
    cpu = min(os.sched_getaffinity(0))
    tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    saved = {tid: os.sched_getaffinity(tid) for tid in tids}
    mine = os.sched_getaffinity(0)
    try:
        for tid in tids:
            os.sched_setaffinity(tid, {cpu})
        os.sched_setaffinity(0, {cpu})
        return measure()
    finally:
        os.sched_setaffinity(0, mine)
        for tid, cpus in saved.items():
            try:
                os.sched_setaffinity(tid, cpus)
            except ProcessLookupError:
                pass


def echo_floors(runs: int) -> dict[str, float]:
    cpus = sorted(os.sched_getaffinity(0))
    floors = {"same_core": unix_echo_floor_us(runs, (cpus[0], cpus[0]))}
    if len(cpus) > 1:
        floors["two_cores"] = unix_echo_floor_us(runs, (cpus[0], cpus[1]))
    return floors


def measure_sdk(runs: int, agent_python: str) -> tuple[dict[str, float], float, dict[str, Any]]:
    work = Path(tempfile.mkdtemp(prefix="edgefleet-offload-"))
    model_path = work / "digits.onnx"
    model_path.write_bytes(kit.digits_mlp())
    x = kit.sample(1)
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    expected = sess.run(None, {"input": x})[0]
    bare = lambda: sess.run(None, {"input": x})  # noqa: E731
    c_names = [o.name for o in sess.get_outputs()]
    bare_c = lambda: sess._sess.run(c_names, {"input": x}, None)  # noqa: E731 - the C session under the wrapper

    embedded = Client.standalone(model_path)
    assert np.array_equal(embedded.infer("digits", x).outputs["probabilities"], expected)
    # Interleaved rounds: the machine's load drifts; each path's figure is the median over all its rounds.
    bare_s, bare_c_s, emb_s = [], [], []
    for _ in range(5):
        bare_s += timed(bare, runs // 5)
        bare_c_s += timed(bare_c, runs // 5)
        emb_s += timed(lambda: embedded.infer("digits", x), runs // 5)
    bare_s.sort()
    bare_c_s.sort()
    emb_s.sort()

    bookkeeping = service_bookkeeping_us(work, x, runs)
    proc, info = start_agent(work, agent_python)
    try:
        client = Client(info["unix_socket"], timeout_s=30)
        _wait(lambda: _ready(client, x), 60, "the agent served digits")
        assert np.array_equal(client.infer("digits", x).outputs["probabilities"], expected)
        unix_s = timed(lambda: client.infer("digits", x), runs)
        unix_same_core = _on_one_core(proc.pid, lambda: p50(timed(lambda: client.infer("digits", x), runs)))
        body, hl = oip_codec.encode_request({"input": x})
        conn = http.client.HTTPConnection(info["http_host"], info["http_port"], timeout=30)
        headers = {"Content-Type": "application/octet-stream", oip_codec.HEADER_LENGTH: str(hl)}

        def http_binary() -> tuple[bytes, str | None]:
            conn.request("POST", "/v2/models/digits/infer", body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
            if r.status != 200:
                raise RuntimeError(data)
            return data, r.getheader(oip_codec.HEADER_LENGTH)

        data, raw_length = http_binary()
        resp = oip_codec.decode_response(data, int(raw_length) if raw_length is not None else None)
        assert np.array_equal(resp.outputs["probabilities"], expected)
        http_s = timed(http_binary, runs)
        rss = _rss_mb(proc.pid)
        client.close()
        conn.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    floor = p50(bare_s)
    overhead = {"embedded_p50": round(p50(emb_s) - floor, 2), "unix_p50": round(p50(unix_s) - floor, 2),
                "unix_p99": round(p99(unix_s) - floor, 2), "http_binary_p50": round(p50(http_s) - floor, 2)}
    detail = {"bare_session_run_p50_us": round(floor, 2), "bare_c_session_run_p50_us": round(p50(bare_c_s), 2),
              "embedded_over_c_session_p50_us": round(p50(emb_s) - p50(bare_c_s), 2),
              "unix_echo_floor_us": echo_floors(runs), "agent_python": agent_python,
              "embedded_p50_us": round(p50(emb_s), 2),
              "unix_p50_us": round(p50(unix_s), 2), "unix_p99_us": round(p99(unix_s), 2),
              "unix_p50_same_core_us": round(unix_same_core, 2),
              "http_binary_p50_us": round(p50(http_s), 2), "runs": runs, "service_bookkeeping_us": bookkeeping,
              "agent_vmhwm_mb": round(rss.get("VmHWM", 0.0), 1), "bare_ort_process_rss_mb": round(
                  bare_rss_mb(model_path), 1)}
    return overhead, round(rss["VmRSS"], 1), detail


def service_bookkeeping_us(work: Path, x: np.ndarray, runs: int) -> float:
    from edgefleet.edge_agent.inference import InferenceService
    from edgefleet.edge_agent.meters import ModelledMeter
    from edgefleet.edge_agent.outbox import Outbox
    from edgefleet.edge_agent.telemetry import Telemetry

    installer = kit.install_digits(work / "service" / "models", tmp=work / "service")
    telemetry = Telemetry("bench", 60.0, Outbox(work / "service" / "outbox", 1 << 20))
    service = InferenceService(installer, meter=ModelledMeter(active_watts=6.4), telemetry=telemetry)
    service.load_active()
    runtime = service.get("digits").runtime
    inputs = {"input": x}
    run_s, svc_s = [], []
    for _ in range(5):  # interleaved: the load drifts
        run_s += timed(lambda: runtime.run(inputs), runs // 5)
        svc_s += timed(lambda: service.run("digits", inputs), runs // 5)
    return round(p50(sorted(svc_s)) - p50(sorted(run_s)), 2)


def _ready(client: Client, x: np.ndarray) -> bool:
    try:
        client.infer("digits", x)
        return True
    except Exception:  # noqa: BLE001 - not serving yet
        return False


def _section(name: str, fn) -> Any:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - one missing part must not stop the rest
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        print(f"bench/offload.py: section {name} failed: {last}", file=sys.stderr)
        return {"note": f"not measured: {last}"}


def _cloud(seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        from offload_cloud import measure_cloud_server
    except ImportError as exc:
        out["note"] = f"bench/offload_cloud.py not importable ({exc})"
    else:
        out.update(_section("cloud_server", lambda: measure_cloud_server(seconds=seconds)))
    return out


def _grpc(seconds: float) -> Any:
    try:
        from offload_grpc import measure_grpc_server
    except ImportError as exc:
        return {"note": f"bench/offload_grpc.py not importable ({exc})"}
    return _section("grpc", lambda: measure_grpc_server(seconds=seconds))


def _mlserver(seconds: float) -> Any:
    try:
        import offload_mlserver
    except ImportError as exc:
        return {"note": f"bench/offload_mlserver.py not importable ({exc})"}
    fn = getattr(offload_mlserver, "measure_mlserver", None)
    if fn is None:
        return {"note": "bench/offload_mlserver.py has no measure_mlserver()"}
    return _section("mlserver", lambda: fn(seconds=seconds))


def _policy(seconds: float) -> tuple[Any, Any]:
    try:
        from offload_policy import measure_cascade, measure_policy
    except ImportError as exc:
        note = {"note": f"bench/offload_policy.py not importable ({exc})"}
        return note, note
    return (_section("policy", lambda: measure_policy(seconds=max(seconds * 4, 12.0))),
            _section("cascade", measure_cascade))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object (the default prints it indented)")
    ap.add_argument("--runs", type=int, default=5000, help="timed calls per SDK path")
    ap.add_argument("--seconds", type=float, default=3.0, help="per load point of the cloud benchmarks")
    ap.add_argument("--agent-python", default=sys.executable,
                    help="the interpreter that runs the agent process (default: this one). A device installs "
                         "'.[agent]' only; this dev venv also holds the CLI's and cloud's libraries, some of which "
                         "the agent's imports pull in where present (httpx loads click, rich and pygments for its "
                         "own CLI): give a lean venv's python for the device's figure (bench/README.md)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    args = ap.parse_args()
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - set(SECTIONS)
    if unknown:
        ap.error(f"--only: unknown section(s) {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    out: dict[str, Any] = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                       "load_avg_1m": round(os.getloadavg()[0], 2), "onnxruntime": ort.__version__,
                                       "platform": platform.platform()}}
    if "sdk" in only:
        result = _section("sdk", lambda: measure_sdk(args.runs, args.agent_python))
        if isinstance(result, tuple):
            out["sdk_overhead_us"], out["agent_rss_mb"], out["sdk_detail"] = result
        else:
            out["sdk_overhead_us"], out["agent_rss_mb"] = result, None
    if "cloud" in only or "grpc" in only:
        cloud = _cloud(args.seconds) if "cloud" in only else {}
        if "grpc" in only:
            cloud["grpc"] = _grpc(args.seconds)
        out["cloud_server"] = cloud
    if "mlserver" in only:
        out["mlserver"] = _mlserver(args.seconds)
    if "policy" in only:
        out["policy"], out["cascade"] = _policy(args.seconds)
    out["machine"]["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
