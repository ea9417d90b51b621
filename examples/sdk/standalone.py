"""A device app with no agent: `Client.standalone` runs the ONNX model in this process and, given a cloud, sends
what the offload policy says must go there straight to the cloud's Open Inference Protocol server; per request
where it ran, why and how long it took, then a summary.

    .venv/bin/python examples/sdk/standalone.py MODEL.onnx [--cloud-url URL [--token T] [--p95-ms 5]
        [--mj-per-inference 2] [--energy-j-per-min 30] [--cascade-threshold 0.9]] [-n 20] [--deadline-ms 20]
        [--active-watts 6.4] [--batch 1] [--inputs data.npz] [--json]

Any ONNX model: its inputs' names, dtypes and shapes come from the ONNX Runtime session, and each request carries
random data of that signature or rows of `--inputs`. Without `--cloud-url` every request runs here (reason
`offload_disabled`: nothing could go anywhere else) and the budget flags do nothing. With it, the agent's own
policy decides each request (local p95 and mJ against the budgets, the deadline, the cloud's round trip, a
circuit breaker, hysteresis; the cascade with `--cascade-threshold`), and a cloud call that fails is answered
here (`cloud_failed_fallback`). The cloud knows the model by `--name` (default: the file's stem); the token is
`--token`, else $EDGEFLEET_TOKEN (a device or admin token of the cloud).

Exit status: 0 when the run finished, 1 when it cannot run (no such model file, a file ONNX Runtime cannot load,
inputs the model refuses), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

from _shared import (
    AppError,
    add_request_args,
    describe,
    input_maker,
    main_guard,
    parser_for,
    plural,
    positive_float,
    report,
    session_signature,
    timed,
)

from edgefleet.sdk import Client

BUDGETS = ("p95_ms", "mj_per_inference", "energy_j_per_min")


def unit_interval(text: str) -> float:
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = parser_for(__doc__)
    parser.add_argument("model", type=Path, help="the .onnx file to run")
    parser.add_argument("--name", help="the model's name on the cloud (default: the file's stem)")
    parser.add_argument("--cloud-url", help="the cloud's OIP server, e.g. https://cloud.example:8000 (default: none, "
                                            "everything runs here)")
    parser.add_argument("--token", help="bearer token for the cloud (default: $EDGEFLEET_TOKEN)")
    parser.add_argument("--p95-ms", type=positive_float, help="latency budget: local p95 over it offloads")
    parser.add_argument("--mj-per-inference", type=positive_float, help="energy budget per inference (needs "
                                                                        "--active-watts for a figure)")
    parser.add_argument("--energy-j-per-min", type=positive_float, help="local inference energy per trailing minute")
    parser.add_argument("--cascade-threshold", type=unit_interval,
                        help="send a local answer less sure than this (max probability) to the cloud")
    parser.add_argument("--active-watts", type=positive_float,
                        help="the device's power while it infers, for an estimated mJ per request (default: none)")
    parser.add_argument("--timeout-s", type=positive_float, default=2.0,
                        help="longest wait for the cloud's answer before answering here (default 2)")
    add_request_args(parser)
    args = parser.parse_args(argv)
    if args.cloud_url is not None and not args.cloud_url.startswith(("http://", "https://")):
        parser.error(f"--cloud-url must start with http:// or https://, got {args.cloud_url!r}")
    return args


def run(args: argparse.Namespace) -> int:
    if not args.model.is_file():
        raise AppError(f"no model file at {args.model}; give the path of an .onnx file")
    budgets = {k: getattr(args, k) for k in BUDGETS if getattr(args, k) is not None}
    options = {"name": args.name, "active_watts": args.active_watts}
    if args.cloud_url:
        options.update(budgets=budgets or None, timeout_s=args.timeout_s, cascade_threshold=args.cascade_threshold)
    elif budgets or args.cascade_threshold is not None:
        print("note: budgets and the cascade need --cloud-url: without a cloud every request runs here",
              file=sys.stderr)
    token = args.token if args.token is not None else os.environ.get("EDGEFLEET_TOKEN")
    with Client.standalone(args.model, cloud_url=args.cloud_url, token=token, **options) as app:
        signature = session_signature(app.session)
        make = input_maker(signature, args)
        if not args.json:
            target = f"offload to {args.cloud_url}" if args.cloud_url else "no cloud"
            print(f"{app.name} from {args.model} (here, {target}), inputs {describe(signature)}: "
                  f"{plural(args.requests, 'request')}")
        rows = []
        started = time.perf_counter()
        for i in range(args.requests):
            timed(i, partial(app.infer, app.name, make(i), deadline_ms=args.deadline_ms, tier=args.tier), rows, args)
        elapsed = time.perf_counter() - started
    report({"model": app.name, "path": str(args.model), "cloud_url": args.cloud_url, "inputs": signature}, rows,
           elapsed, args)
    return 0


if __name__ == "__main__":
    main_guard(lambda: run(parse_args()))
