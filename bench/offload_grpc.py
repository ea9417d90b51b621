"""The cloud's OIP gRPC server (cloud/inference/grpc_server.py): what it adds over a bare `session.run`, and how
many requests a second it answers.

    .venv/bin/python bench/offload_grpc.py [--seconds 3] [--json] [--server sync|aio-inline|aio-executor|echo]

Builds the digits-size MLP of bench/offload_cloud.py (64 -> 32 -> 10), pushes it into a fresh data dir, and runs
the gRPC server as its own process over a real Fleet and ModelPool. Clients are separate processes (the GIL), each
sending a prebuilt, serialized ModelInferRequest (raw_input_contents, one sample) over one channel, so the client
side costs as little as it can in Python:

  overhead_p50_us  median client-observed latency at concurrency 1, minus the median of bare session.run (same
                   model, one thread, in this process)
  rps_c1           requests per second, one call in flight
  rps_c16          requests per second, 16 in flight: 4 client processes with 4 calls each (grpc.aio)

`--server` picks the server under test: `sync` is what grpc_server.py ships; the two grpc.aio variants (the same
servicer, called on the event loop or in a thread pool) are here to keep the measurement behind that choice
reproducible; `echo` is grpcio answering a prebuilt response with no work at all, the floor under any Python gRPC
server with these clients on this machine (2026-12-03, 2 cores: 567 us at c1, 1.7k req/s at c1, 3.8k at c16, where
the shipped server measured 630-770 us, 1.3-1.5k and 2.5-3.1k). `measure_grpc(address, token, model, inputs,
seconds)` measures any OIP gRPC server (MLServer's, too)
and returns the same dict for bench/offload.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from offload_cloud import bare_run_p50_us, digits_mlp  # noqa: E402

WARMUP_S = 0.5
_TOKEN_ENV = "EDGEFLEET_BENCH_TOKEN"  # not argv: a token on a command line shows in `ps`
_METHOD = "/inference.GRPCInferenceService/ModelInfer"


def infer_request(model: str, inputs: dict[str, np.ndarray]) -> bytes:
    from edgefleet.protos import grpc_predict_v2_pb2 as pb
    from edgefleet.protos.oip import NUMPY_TO_DATATYPE

    req = pb.ModelInferRequest(model_name=model)
    for name, array in inputs.items():
        req.inputs.add(name=name, datatype=NUMPY_TO_DATATYPE[array.dtype.name], shape=array.shape)
        req.raw_input_contents.append(np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes())
    return req.SerializeToString()


# -- the clients (each its own process) --------------------------------------------------------------------------


def _client_sync(address: str, request: bytes, seconds: float) -> dict[str, Any]:
    import grpc

    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(_METHOD)  # bytes in, bytes out: no protobuf work on the client
        metadata = (("authorization", f"Bearer {os.environ[_TOKEN_ENV]}"),)
        end = time.perf_counter() + WARMUP_S
        while time.perf_counter() < end:
            call(request, metadata=metadata)
        latencies = []
        end = time.perf_counter() + seconds
        while (t0 := time.perf_counter()) < end:
            call(request, metadata=metadata)
            latencies.append(time.perf_counter() - t0)
    return {"count": len(latencies), "latencies": latencies}


async def _client_aio(address: str, request: bytes, seconds: float, in_flight: int) -> dict[str, Any]:
    import grpc

    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(_METHOD)
        metadata = (("authorization", f"Bearer {os.environ[_TOKEN_ENV]}"),)
        count = 0

        async def loop(until: float, counted: bool) -> None:
            nonlocal count
            while time.perf_counter() < until:
                await call(request, metadata=metadata)
                count += counted

        await asyncio.gather(*(loop(time.perf_counter() + WARMUP_S, False) for _ in range(in_flight)))
        await asyncio.gather(*(loop(time.perf_counter() + seconds, True) for _ in range(in_flight)))
    return {"count": count, "latencies": []}


def _drive(address: str, token: str, request: bytes, processes: int, in_flight: int,
           seconds: float) -> tuple[float, list[float]]:
    with tempfile.NamedTemporaryFile(prefix="oip-grpc-request-", delete=False) as f:
        f.write(request)
    try:
        env = {**os.environ, _TOKEN_ENV: token}
        cmd = [sys.executable, __file__, "--client", address, "--request", f.name, "--seconds", str(seconds),
               "--in-flight", str(in_flight)]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, cwd=ROOT) for _ in range(processes)]
        results = []
        for proc in procs:
            out, _ = proc.communicate(timeout=seconds + 120)
            if proc.returncode != 0:
                raise RuntimeError(f"a bench client failed (exit {proc.returncode})")
            results.append(json.loads(out))
    finally:
        os.unlink(f.name)
    return sum(r["count"] for r in results) / seconds, [x for r in results for x in r["latencies"]]


def measure_grpc(address: str, token: str, model: str, inputs: dict[str, np.ndarray], seconds: float, *,
                 bare_us: float | None = None) -> dict[str, float]:
    """{overhead_p50_us, rps_c1, rps_c16, latency_p50_us, bare_run_p50_us} of the OIP gRPC server at `address`.
    `bare_us`: the bare session.run median to subtract (0 when not given: overhead is then the whole latency)."""
    request = infer_request(model, inputs)
    rps_c1, latencies = _drive(address, token, request, 1, 1, seconds)
    rps_c16, _ = _drive(address, token, request, 4, 4, seconds)
    p50 = statistics.median(latencies) * 1e6
    bare = bare_us or 0.0
    return {"overhead_p50_us": round(p50 - bare, 1), "rps_c1": round(rps_c1), "rps_c16": round(rps_c16),
            "latency_p50_us": round(p50, 1), "bare_run_p50_us": round(bare, 1)}


# -- the server under test (its own process) ---------------------------------------------------------------------


def _serve(data_dir: Path, kind: str, workers: int | None = None) -> None:
    from edgefleet.cloud.inference import ModelPool, VariantResolver
    from edgefleet.cloud.inference.grpc_server import start_grpc_server
    from edgefleet.cloud.services import Fleet
    from edgefleet.cloud.settings import Settings

    fleet = Fleet.from_settings(Settings(data_dir=data_dir))
    pool = ModelPool(VariantResolver(fleet))
    if kind == "echo":
        _serve_echo(workers)
    elif kind == "sync":
        handle = start_grpc_server(pool, fleet.authenticate, workers=workers)
        print(handle.port, flush=True)
        sys.stdin.read()  # until the parent closes our stdin
        handle.stop(0)
    else:
        asyncio.run(_serve_aio(pool, fleet.authenticate, inline=kind == "aio-inline"))


def _serve_echo(workers: int | None) -> None:
    """The floor under any Python gRPC server here: grpcio's sync server answering ModelInfer with a prebuilt
    response, no token check, no protobuf parsing (bytes in, bytes out), no model."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from edgefleet.cloud.inference.grpc_server import SERVICE
    from edgefleet.protos import grpc_predict_v2_pb2 as pb

    answer = pb.ModelInferResponse(model_name="digits", model_version="1").SerializeToString()
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: answer)
    server = grpc.server(ThreadPoolExecutor(max_workers=workers or 8))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {"ModelInfer": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    sys.stdin.read()
    server.stop(0)


async def _serve_aio(pool: Any, authenticate: Any, *, inline: bool) -> None:
    """The alternative measured against the sync server: grpc.aio, the same servicer (a private of grpc_server.py,
    borrowed for the comparison) and the same token cache and error mapping."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from edgefleet.cloud.errors import CloudError
    from edgefleet.cloud.inference.auth import TokenCache
    from edgefleet.cloud.inference.grpc_server import SERVICE, _Servicer, status_code
    from edgefleet.protos import grpc_predict_v2_pb2 as pb

    tokens, servicer = TokenCache(authenticate), _Servicer(pool, max_elements=1 << 26, version="bench")
    executor, loop = ThreadPoolExecutor(max_workers=8), asyncio.get_running_loop()

    async def model_infer(request: Any, context: Any) -> Any:
        header = next((v for k, v in context.invocation_metadata() if k == "authorization"), None)
        try:
            tokens.check(header)
            if inline:
                return servicer.ModelInfer(request, context)
            return await loop.run_in_executor(executor, servicer.ModelInfer, request, context)
        except CloudError as exc:
            await context.abort(status_code(exc), exc.message)

    handler = grpc.unary_unary_rpc_method_handler(model_infer, request_deserializer=pb.ModelInferRequest.FromString,
                                                  response_serializer=pb.ModelInferResponse.SerializeToString)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {"ModelInfer": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    await server.stop(0)


def measure_grpc_server(seconds: float = 3.0, server: str = "sync", workers: int | None = None) -> dict[str, float]:
    from edgefleet.cloud.services import Fleet
    from edgefleet.cloud.settings import Settings

    model = digits_mlp()
    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    bare_us = bare_run_p50_us(model, x)
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        data_dir = Path(tmp) / "data"
        fleet = Fleet.from_settings(Settings(data_dir=data_dir))
        try:
            fleet.push_model("digits", model)
            token = fleet.ensure_admin_token() or ""
        finally:
            fleet.close()
        extra = ["--workers", str(workers)] if workers else []
        proc = subprocess.Popen([sys.executable, __file__, "--serve", str(data_dir), "--server", server, *extra],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()  # the bound port, once the server listens
            if not line.strip():
                raise RuntimeError(f"the {server} gRPC server did not start (exit {proc.poll()})")
            address = f"127.0.0.1:{int(line)}"
            if server != "echo":  # the echo server's answer carries no outputs
                _check_answer(address, token, model, x)
            figures = measure_grpc(address, token, "digits", {"x": x}, seconds, bare_us=bare_us)
        finally:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return figures


def _check_answer(address: str, token: str, model: bytes, x: np.ndarray) -> None:
    """One request, its answer compared with bare onnxruntime: the figures are of right answers."""
    import grpc
    import onnxruntime as ort

    from edgefleet.protos import grpc_predict_v2_pb2 as pb

    with grpc.insecure_channel(address) as channel:
        raw = channel.unary_unary(_METHOD)(infer_request("digits", {"x": x}),
                                           metadata=(("authorization", f"Bearer {token}"),), timeout=60)
    got = pb.ModelInferResponse.FromString(raw)
    answer = np.frombuffer(got.raw_output_contents[0], "<f4").reshape(list(got.outputs[0].shape))
    want = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    if not np.array_equal(answer, want):
        raise RuntimeError("the server's answer differs from bare onnxruntime")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per figure")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--server", choices=["sync", "aio-inline", "aio-executor", "echo"], default="sync",
                        help="sync: what grpc_server.py ships; aio-*: the grpc.aio alternatives; echo: grpcio "
                             "answering a prebuilt response with no work, the floor under any Python gRPC server")
    parser.add_argument("--workers", type=int, help="the sync server's thread pool (default: grpc_server.py's)")
    # Internal: the server and client processes run this file again.
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--request", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--in-flight", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        _serve(args.serve, args.server, args.workers)
        return
    if args.client is not None:
        request = args.request.read_bytes()
        if args.in_flight == 1:
            result = _client_sync(args.client, request, args.seconds)
        else:
            result = asyncio.run(_client_aio(args.client, request, args.seconds, args.in_flight))
        print(json.dumps(result))
        return
    results = {"grpc": measure_grpc_server(seconds=args.seconds, server=args.server, workers=args.workers)}
    if args.json:
        print(json.dumps(results))
        return
    figures = results["grpc"]
    print(f"cloud OIP gRPC server ({args.server}), {os.cpu_count()} cores, digits MLP 64->32->10, bare session.run "
          f"p50 {figures['bare_run_p50_us']} us")
    print(f"  grpc         overhead p50 {figures['overhead_p50_us']:7.1f} us   c1 {figures['rps_c1']:6d} req/s   "
          f"c16 {figures['rps_c16']:6d} req/s")


if __name__ == "__main__":
    main()
