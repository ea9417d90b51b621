"""MLServer as an offload target: how many requests a second a real MLServer 1.7.1 answers for the same model and
the same clients as the cloud's own server (bench/offload_cloud.py), the figure our server has to beat.

    .venv/bin/python bench/offload_mlserver.py [--seconds 3] [--parallel-workers 0] [--no-grpc] [--json]

MLServer runs from its own venv (tests/mlserver/env.py: built once per machine, cached) as its own process
(tests/mlserver/server.py), serving the digits MLP of bench/offload_cloud.py (64 -> 32 -> 10) through
tests/mlserver/onnx_runtime.py, one sample a request. The clients are offload_cloud's: separate processes (the GIL),
keep-alive HTTP/1.1 connections, prebuilt request bytes. MLServer's REST has no binary tensor extension, so its
figures are OIP JSON both ways (compare with cloud_server.rest_json):

  rps_c1          requests per second, one connection
  rps_c16         requests per second, 16 connections over 4 client processes
  latency_p50_us  median client-observed latency at concurrency 1; overhead_p50_us minus bare session.run
  grpc            the same over MLServer's gRPC port (bench/offload_grpc.py's clients, raw_input_contents)

`--parallel-workers N`: MLServer's inference pool (0: inference on the server's event loop, the default here;
MLServer's own default is 1, a worker process behind an IPC queue). `--debug`: MLServer's own default, an access
log line a request; off here, as an operator would run it. Every answer is checked against bare
onnxruntime before the figures are taken. MLServer's uvicorn runs h11: pip's mlserver 1.7.1 pulls no httptools
(with httptools added by hand, measured once: c1 1.9k, c16 2.2k req/s).
`measure_mlserver(model_path, inputs, seconds)` returns the same dict for bench/offload.py.

Measured on the 2-core container (load average ~1, bare session.run p50 12-13 us, 3 s a figure):

    MLServer settings                    REST JSON: p50     c1          c16       gRPC: c1    c16
    parallel_workers 0, debug off        667-700 us         1.35-1.49k  1.33-1.67k  0.7-1.2k  1.2-1.9k
    parallel_workers 1, debug off        1382 us            709         729         543       812
    parallel_workers 1, debug on (its    1587 us            609         865         654       920
      defaults)

MLServer starts (Popen to every model ready) in 1.1-1.3 s with parallel_workers 0, 2.2-2.5 s with 1; its venv
builds in 44-45 s from the PyPI mirror here, once per machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from offload_cloud import _complete, _drive, bare_run_p50_us, digits_mlp  # noqa: E402

from tests.mlserver.env import MLServerEnv  # noqa: E402
from tests.mlserver.server import start_mlserver  # noqa: E402


def _request(port: int, model: str, body: bytes) -> bytes:
    head = [f"POST /v2/models/{model}/infer HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Length: {len(body)}",
            "Content-Type: application/json"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _check_answer(port: int, request: bytes, model: bytes, inputs: dict[str, np.ndarray]) -> None:
    """One request, every output decoded and compared with bare onnxruntime: the figures are of right answers."""
    import onnxruntime as ort

    from edgefleet.common.oip_codec import decode_response

    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        buf = bytearray()
        while not (size := _complete(buf)):
            buf += s.recv(1 << 16)
    body = bytes(buf[:size]).split(b"\r\n\r\n", 1)[1]
    got = decode_response(body, None).outputs
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    want = dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs)))
    if set(got) != set(want) or not all(np.array_equal(got[k], want[k]) for k in want):
        raise RuntimeError("MLServer's answer differs from bare onnxruntime")


def measure_mlserver(model_path: Path | str | None = None, inputs: dict[str, np.ndarray] | None = None,
                     seconds: float = 3.0, *, parallel_workers: int = 0, debug: bool = False,
                     grpc: bool = True) -> dict[str, Any]:
    """{rps_c1, rps_c16, latency_p50_us, overhead_p50_us, ..., grpc: {...}} of MLServer serving `model_path`
    (default: the digits MLP, one sample of seeded noise) over OIP JSON, clients in their own processes."""
    from edgefleet.common.oip_codec import encode_request

    build = MLServerEnv().ensure()
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-mlserver-") as tmp:
        if model_path is None:
            model_path = Path(tmp) / "digits.onnx"
            model_path.write_bytes(digits_mlp())
        model = Path(model_path).read_bytes()
        if inputs is None:
            inputs = {"x": np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)}
        if len(inputs) == 1:
            bare_us = bare_run_p50_us(model, next(iter(inputs.values())))  # offload_cloud's: input "x"
        else:
            bare_us = 0.0
        handle = start_mlserver(model_path, "model", Path(tmp) / "mlserver", parallel_workers=parallel_workers,
                                debug=debug)
        try:
            body, _ = encode_request(inputs, binary=False)
            request = _request(handle.http_port, "model", body)
            _check_answer(handle.http_port, request, model, inputs)
            rps_c1, latencies = _drive(handle.http_port, request, 1, 1, seconds)
            rps_c16, _ = _drive(handle.http_port, request, 4, 4, seconds)
            p50 = statistics.median(latencies) * 1e6
            out: dict[str, Any] = {
                "rps_c1": round(rps_c1), "rps_c16": round(rps_c16), "latency_p50_us": round(p50, 1),
                "overhead_p50_us": round(p50 - bare_us, 1), "bare_run_p50_us": round(bare_us, 1), "body": "json",
                "server": f"MLServer 1.7.1, parallel_workers {parallel_workers}, uvicorn {_http_parser(build.venv)}, "
                          f"debug {'on' if debug else 'off'}",
                "server_start_s": round(handle.start_s, 2),
                "venv_build_s": round(build.seconds, 1) if build.built else "cached"}
            if grpc:
                out["grpc"] = _grpc(handle.grpc_address, inputs, seconds, bare_us)
        finally:
            handle.stop()
    return out


def _http_parser(venv: Path) -> str:
    """What uvicorn will parse HTTP with in MLServer's venv: httptools when installed, else h11 (~200 us more)."""
    return "httptools" if any(venv.glob("lib/python*/site-packages/httptools")) else "h11"


def _grpc(address: str, inputs: dict[str, np.ndarray], seconds: float, bare_us: float) -> dict[str, Any]:
    try:
        from offload_grpc import measure_grpc
    except ImportError as exc:
        return {"note": f"bench/offload_grpc.py not importable ({exc})"}
    return measure_grpc(address, "", "model", inputs, seconds, bare_us=bare_us)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per figure")
    parser.add_argument("--parallel-workers", type=int, default=0, help="MLServer's inference pool size")
    parser.add_argument("--debug", action="store_true", help="MLServer debug mode (its default): a log line a request")
    parser.add_argument("--no-grpc", action="store_true", help="REST only")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    started = time.monotonic()
    results = measure_mlserver(seconds=args.seconds, parallel_workers=args.parallel_workers, debug=args.debug,
                               grpc=not args.no_grpc)
    if args.json:
        print(json.dumps(results))
        return
    print(f"{results['server']}, {os.cpu_count()} cores, digits MLP 64->32->10 (bench took "
          f"{time.monotonic() - started:.0f} s, MLServer started in {results['server_start_s']} s)")
    print(f"  rest_json  latency p50 {results['latency_p50_us']:8.1f} us   c1 {results['rps_c1']:6d} req/s   "
          f"c16 {results['rps_c16']:6d} req/s")
    g = results.get("grpc")
    if isinstance(g, dict) and "rps_c1" in g:
        print(f"  grpc       latency p50 {g['latency_p50_us']:8.1f} us   c1 {g['rps_c1']:6d} req/s   "
              f"c16 {g['rps_c16']:6d} req/s")


if __name__ == "__main__":
    main()
