"""What the three SDK example apps share: the model's signature, inputs that fit it, and the run's summary.

Nothing here knows the model. Its inputs come from its signature: the agent's `GET /v2/models/{name}` (asked over
the same unix socket the SDK uses: the agent tells HTTP from the SDK's frames by a connection's first byte), or the
ONNX Runtime session in stand-alone mode. Each request gets random data of that signature's dtype and shape (a
dynamic first dimension is `--batch`, any other dynamic one `--dim`), or rows of the app's own data (`--inputs`).

Imports numpy, the standard library and `edgefleet.sdk` only, as an app on a lean install (`pip install
'edgefleet[agent]'`) would.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import socket
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from edgefleet.sdk import AgentUnavailable, Client, InvalidInput, ModelUnknown, SdkError

TIERS = ("realtime", "background")  # the SDK's own (edgefleet.common.oip_frames.TIERS)
# OIP datatype -> numpy, the KServe v2 table (protos/oip.py DATATYPES); BYTES has no fixed-size numpy form.
DATATYPES = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
             "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64", "FP16": "float16",
             "FP32": "float32", "FP64": "float64"}
# ONNX Runtime's type strings -> OIP datatype, for the stand-alone app's session.
ORT_TYPES = {"tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16",
             "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64", "tensor(int8)": "INT8", "tensor(int16)": "INT16",
             "tensor(int32)": "INT32", "tensor(int64)": "INT64", "tensor(float16)": "FP16", "tensor(float)": "FP32",
             "tensor(double)": "FP64", "tensor(string)": "BYTES"}

Signature = list  # [{"name": str, "datatype": "FP32", "shape": [-1, 64]}], -1: any size, as OIP metadata says it


class AppError(Exception):
    """A failure of the app's own making (its arguments, its files): one line, exit code 1."""


# -- arguments ---------------------------------------------------------------------------------------------------------


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {text}")
    return value


def add_request_args(parser: argparse.ArgumentParser) -> None:
    """The flags every example takes: how many requests, with what deadline and tier, on what data."""
    parser.add_argument("-n", "--requests", type=positive_int, default=20, help="requests to send (default 20)")
    parser.add_argument("--deadline-ms", type=positive_float,
                        help="each request's deadline in ms; the policy routes to keep it (default: none)")
    parser.add_argument("--tier", choices=TIERS, default="realtime",
                        help="realtime (default) or background: not latency-bound, stays local unless the energy "
                             "window is spent")
    parser.add_argument("--batch", type=positive_int, default=1,
                        help="rows per request, for a model whose first dimension is dynamic (default 1)")
    parser.add_argument("--dim", type=positive_int, default=1,
                        help="size of any other dynamic dimension of random inputs (default 1)")
    parser.add_argument("--inputs", type=Path, metavar="FILE",
                        help="your own data instead of random: .npz with one array per input name (or `x` for a "
                             "one-input model, as examples/digits writes its sets) or .npy for a one-input model; "
                             "each request takes the next --batch rows")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")


# -- the signature -----------------------------------------------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def find_agent(args: argparse.Namespace) -> str:
    """The agent's unix socket as the SDK finds it (`Client.socket_path`), with this app's flags in the hint."""
    try:
        return Client(args.socket, data_dir=args.data_dir).socket_path
    except AgentUnavailable as exc:
        raise AgentUnavailable(f"{exc} (here: --socket PATH or --data-dir DIR)") from None


def agent_signature(socket_path: str, model: str, version: str | None, timeout_s: float) -> tuple[Signature, Any]:
    """(inputs, active version) of `model` as the agent serves it; the SDK's typed errors when it cannot say."""
    path = f"/v2/models/{quote(model, safe='')}"
    if version is not None:
        path += f"/versions/{quote(version, safe='')}"
    conn = _UnixHTTPConnection(socket_path, timeout_s)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        status, body = response.status, response.read()
    except OSError as exc:
        why = exc.strerror or str(exc) or type(exc).__name__
        raise AgentUnavailable(f"cannot reach the agent at {socket_path}: {why}; is edgefleet-agent running, with "
                               "api.unix_socket set, and this user in its group?") from None
    except http.client.HTTPException as exc:
        raise AgentUnavailable(f"the agent at {socket_path} sent no HTTP answer ({exc!r}); is it an edgefleet "
                               "agent's socket?") from None
    finally:
        conn.close()
    try:
        doc = json.loads(body)
    except ValueError:
        doc = {}
    doc = doc if isinstance(doc, dict) else {}
    if status == 404:
        raise ModelUnknown(str(doc.get("error") or f"the agent has no model {model!r}"), status=404)
    if status != 200:
        raise AgentUnavailable(f"the agent answered {status} to GET {path}: {doc.get('error', body[:200])}",
                               status=status)
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise AgentUnavailable(f"the agent's metadata for {model!r} names no inputs: {doc}")
    versions = doc.get("versions") or [None]
    return inputs, versions[0]


def session_signature(session: Any) -> Signature:
    """An ONNX Runtime session's inputs in the agent's metadata form."""
    return [{"name": i.name, "datatype": ORT_TYPES.get(i.type, i.type),
             "shape": [d if isinstance(d, int) and d >= 0 else -1 for d in i.shape]} for i in session.get_inputs()]


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def describe(signature: Signature) -> str:
    """'x FP32 [-1, 64], mask BOOL [-1]', as the SDK's own errors write a signature."""
    return ", ".join(f"{s['name']} {s['datatype']} {s['shape']}" for s in signature)


# -- inputs ------------------------------------------------------------------------------------------------------------


def input_maker(signature: Signature, args: argparse.Namespace) -> Callable[[int], dict[str, np.ndarray]]:
    """`make(i)`: the inputs of request i, random or from --inputs."""
    for spec in signature:
        if spec["datatype"] not in DATATYPES:
            raise AppError(f"input {spec['name']!r} is {spec['datatype']}, which these examples cannot make up; "
                           "the SDK carries numeric tensors only")
    if args.inputs is not None:
        return _from_file(signature, args.inputs, args.batch)
    shapes = {s["name"]: [(args.batch if k == 0 else args.dim) if d < 0 else d for k, d in enumerate(s["shape"])]
              for s in signature}
    dtypes = {s["name"]: np.dtype(DATATYPES[s["datatype"]]) for s in signature}

    def make(i: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng((args.seed, i))
        return {name: _random(rng, shapes[name], dtypes[name]) for name in shapes}

    return make


def _random(rng: np.random.Generator, shape: list[int], dtype: np.dtype) -> np.ndarray:
    if dtype.kind == "f":
        return rng.random(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    return rng.integers(0, 10, shape).astype(dtype)  # small ids and counts: valid for most index-taking inputs


def _from_file(signature: Signature, path: Path, batch: int) -> Callable[[int], dict[str, np.ndarray]]:
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):  # .npy
            arrays = {"": loaded}
        else:  # .npz
            with loaded:
                arrays = {k: loaded[k] for k in loaded.files}
    except FileNotFoundError:
        raise AppError(f"--inputs {path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise AppError(f"--inputs {path}: not a numpy .npz or .npy file ({exc})") from None
    names = [s["name"] for s in signature]
    if len(names) == 1 and names[0] not in arrays:  # a one-input model: .npy, `x`, or the file's only array
        if "" in arrays or "x" in arrays:
            arrays = {names[0]: arrays.get("", arrays.get("x"))}
        elif len(arrays) == 1:
            arrays = {names[0]: next(iter(arrays.values()))}
        else:
            nor = "" if names[0] == "x" else " (nor `x`)"
            raise AppError(f"--inputs {path} has {sorted(arrays)}, none named {names[0]!r}{nor}")
    missing = [n for n in names if n not in arrays]
    if missing:
        raise AppError(f"--inputs {path} lacks {missing}; the model takes {describe(signature)}")
    feeds = {}
    for spec in signature:
        try:
            array = arrays[spec["name"]].astype(DATATYPES[spec["datatype"]], copy=False)
        except (TypeError, ValueError) as exc:
            raise AppError(f"--inputs {path}: {spec['name']!r} does not convert to {spec['datatype']} ({exc})") \
                from None
        if array.ndim == 0:
            raise AppError(f"--inputs {path}: {spec['name']!r} is a scalar; the model takes {describe(signature)}")
        feeds[spec["name"]] = (array, bool(spec["shape"]) and spec["shape"][0] < 0)

    def make(i: int) -> dict[str, np.ndarray]:
        out = {}
        for name, (array, by_rows) in feeds.items():  # a fixed first dimension: the whole array, every request
            out[name] = np.take(array, np.arange(i * batch, (i + 1) * batch) % len(array), axis=0) if by_rows \
                else array
        return out

    return make


# -- the run -----------------------------------------------------------------------------------------------------------


def record(i: int, result: Any, wall_ms: float) -> dict[str, Any]:
    p = result.provenance
    return {"i": i, "where": p.where, "reason": p.reason, "latency_ms": round(wall_ms, 3),
            "agent_latency_ms": None if p.latency_ms is None else round(p.latency_ms, 3),
            "model_version": p.model_version, "variant": p.variant, "escalated": p.escalated,
            "energy_mj": None if p.energy_mj is None else round(p.energy_mj, 4), "energy_source": p.energy_source}


def failure(i: int, exc: SdkError, wall_ms: float) -> dict[str, Any]:
    return {"i": i, "where": "error", "reason": exc.reason, "latency_ms": round(wall_ms, 3), "error": str(exc)}


def survivable(exc: SdkError) -> bool:
    """A failure of one request (its deadline, the cloud) rather than of the whole run (no agent, bad inputs)."""
    return not isinstance(exc, (AgentUnavailable, ModelUnknown, InvalidInput))


def _kept(i: int, t0: float, rows: list[dict[str, Any]], args: argparse.Namespace, result: Any = None,
          exc: SdkError | None = None) -> None:
    """Request i's row (its answer, or the failure it survived) appended to `rows`, and printed unless --json; a
    failure of the whole run is raised."""
    wall_ms = (time.perf_counter() - t0) * 1000.0
    if exc is not None and not survivable(exc):
        raise exc
    row = failure(i, exc, wall_ms) if exc is not None else record(i, result, wall_ms)
    rows.append(row)
    if not args.json:
        print_row(row)


def timed(i: int, call: Callable[[], Any], rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Run request i (`call`), timed as the app waited, into `rows`."""
    t0 = time.perf_counter()
    try:
        result = call()
    except SdkError as exc:
        _kept(i, t0, rows, args, exc=exc)
    else:
        _kept(i, t0, rows, args, result)


async def timed_async(i: int, call: Callable[[], Awaitable[Any]], rows: list[dict[str, Any]],
                      args: argparse.Namespace) -> None:
    """`timed` for a coroutine."""
    t0 = time.perf_counter()
    try:
        result = await call()
    except SdkError as exc:
        _kept(i, t0, rows, args, exc=exc)
    else:
        _kept(i, t0, rows, args, result)


def add_agent_args(parser: argparse.ArgumentParser) -> None:
    """The model on the agent and how to reach the agent: what app_sync.py and app_async.py share."""
    parser.add_argument("model", help="the model's name on the agent, e.g. digits")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket", help="the agent's unix socket (default: $EDGEFLEET_AGENT_SOCKET or api.json)")
    where.add_argument("--data-dir", help="the agent's data_dir, where it writes api.json")
    parser.add_argument("--version", help="a model version the agent has active (default: the active one)")
    parser.add_argument("--timeout-s", type=positive_float, default=10.0,
                        help="longest wait for one answer (default 10)")


def parser_for(doc: str) -> argparse.ArgumentParser:
    """An argparse parser whose description is the script docstring's first paragraph and epilog the rest."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n\n".join(doc.split("\n\n")[1:]))


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def summary(rows: list[dict[str, Any]], elapsed_s: float, deadline_ms: float | None) -> dict[str, Any]:
    ok = [r for r in rows if r["where"] != "error"]
    where = Counter(r["where"] for r in ok)
    wall = [r["latency_ms"] for r in ok]
    agent = [r["agent_latency_ms"] for r in ok if r["agent_latency_ms"] is not None]
    return {
        "requests": len(rows), "answered": len(ok), "failed": len(rows) - len(ok),
        "where": {"local": where.get("local", 0), "cloud": where.get("cloud", 0)},
        "offloaded_share": round(where.get("cloud", 0) / len(ok), 4) if ok else None,
        "reasons": dict(Counter(r["reason"] for r in ok).most_common()),
        "errors": dict(Counter(r["reason"] for r in rows if r["where"] == "error").most_common()),
        "escalated": sum(1 for r in ok if r["escalated"]),
        "latency_ms": {"p50": _pct(wall, 50), "p95": _pct(wall, 95)},
        "agent_latency_ms": {"p50": _pct(agent, 50), "p95": _pct(agent, 95)},
        "deadline_ms": deadline_ms,
        "deadline_met": (sum(1 for w in wall if w <= deadline_ms) if deadline_ms is not None else None),
        "elapsed_s": round(elapsed_s, 3), "rps": round(len(rows) / elapsed_s, 1) if elapsed_s > 0 else None,
    }


def print_row(row: dict[str, Any]) -> None:
    if row["where"] == "error":
        print(f"{row['i']:>5}  error  {row['reason']:<34} {row['latency_ms']:9.3f} ms  {row['error']}")
        return
    agent = "" if row["agent_latency_ms"] is None else f"  (provenance: {row['agent_latency_ms']:.3f} ms)"
    up = "  escalated" if row["escalated"] else ""
    print(f"{row['i']:>5}  {row['where']:<5}  {row['reason']:<34} {row['latency_ms']:9.3f} ms{agent}{up}")


def print_summary(s: dict[str, Any]) -> None:
    share = "-" if s["offloaded_share"] is None else f"{s['offloaded_share']:.1%}"
    print(f"{plural(s['requests'], 'request')} in {s['elapsed_s']:.2f} s ({s['rps']} a second): "
          f"{s['where']['local']} local, {s['where']['cloud']} cloud ({share} offloaded), {s['failed']} failed")
    if s["reasons"]:
        print("reasons: " + ", ".join(f"{k} {v}" for k, v in s["reasons"].items()))
    if s["errors"]:
        print("errors: " + ", ".join(f"{k} {v}" for k, v in s["errors"].items()))
    if s["escalated"]:
        print(f"escalated by the cascade: {s['escalated']}")
    lat = s["latency_ms"]
    if lat["p50"] is not None:
        line = f"latency as this app waited it: p50 {lat['p50']:.3f} ms, p95 {lat['p95']:.3f} ms"
        if s["deadline_ms"] is not None:
            line += f"; deadline {s['deadline_ms']:g} ms met by {s['deadline_met']} of {s['answered']}"
        print(line)


def report(head: dict[str, Any], rows: list[dict[str, Any]], elapsed_s: float, args: argparse.Namespace) -> None:
    """The run's end: one JSON object (--json), else the summary lines (the rows were printed as they came)."""
    s = summary(rows, elapsed_s, args.deadline_ms)
    if args.json:
        json.dump({**head, "tier": args.tier, "batch": args.batch, **s, "per_request": rows}, sys.stdout)
        print()
    else:
        print_summary(s)


def main_guard(run: Callable[[], int]) -> None:
    """Run the app; its errors and the SDK's are one line on stderr and exit 1 (argparse's are exit 2)."""
    try:
        code = run()
    except (SdkError, AppError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
