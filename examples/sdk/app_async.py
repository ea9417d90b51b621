"""A device app on asyncio: `-n` requests to one model through the local agent with `edgefleet.sdk.AsyncClient`,
`--concurrency` of them in flight at once, each run where the agent's offload policy says; per request where it
ran, why and how long it took (in the order they finish), then a summary with the requests per second.

    .venv/bin/python examples/sdk/app_async.py MODEL [--socket PATH | --data-dir DIR] [-n 100] [--concurrency 8]
        [--deadline-ms 20] [--tier realtime|background] [--batch 1] [--inputs data.npz] [--json]

As examples/sdk/app_sync.py (same flags, same output, same exit status), with `--concurrency` workers sharing
one `AsyncClient`; its pool holds that many connections, so no request waits on another's reply. A device that
cannot serve them all in time is where the offload policy earns its keep: with a deadline, the agent keeps what it
can finish and sends the rest to the cloud (reason `deadline_local_too_slow`), when it has an offload target.

The model's signature comes from the agent's metadata (`GET /v2/models/MODEL` on its unix socket), asked once
before the run.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
from functools import partial

from _shared import (
    add_agent_args,
    add_request_args,
    agent_signature,
    describe,
    find_agent,
    input_maker,
    main_guard,
    parser_for,
    plural,
    positive_int,
    report,
    timed_async,
)

from edgefleet.sdk import AsyncClient


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = parser_for(__doc__)
    add_agent_args(parser)
    parser.add_argument("--concurrency", type=positive_int, default=8,
                        help="requests in flight at once, and the client's connections (default 8)")
    add_request_args(parser)
    return parser.parse_args(argv)


async def drive(args: argparse.Namespace, sock: str, make) -> tuple[list[dict], float]:
    rows: list[dict] = []
    numbers = itertools.count()

    async def worker(agent: AsyncClient) -> None:
        for i in numbers:  # shared: each worker takes the next request number
            if i >= args.requests:
                return
            await timed_async(i, partial(agent.infer, args.model, make(i), deadline_ms=args.deadline_ms,
                                         tier=args.tier, version=args.version), rows, args)

    async with AsyncClient(sock, timeout_s=args.timeout_s, max_connections=args.concurrency) as agent:
        started = time.perf_counter()
        tasks = [asyncio.ensure_future(worker(agent)) for _ in range(min(args.concurrency, args.requests))]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # one worker's fatal error (no agent, bad inputs) ends the others
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        elapsed = time.perf_counter() - started
    rows.sort(key=lambda r: r["i"])
    return rows, elapsed


def run(args: argparse.Namespace) -> int:
    sock = find_agent(args)
    signature, version = agent_signature(sock, args.model, args.version, args.timeout_s)
    make = input_maker(signature, args)
    if not args.json:
        deadline = "no deadline" if args.deadline_ms is None else f"deadline {args.deadline_ms:g} ms"
        print(f"{args.model} v{version} at {sock}, inputs {describe(signature)}: "
              f"{plural(args.requests, 'request')}, {args.concurrency} at a time, {deadline}, tier {args.tier}")
    rows, elapsed = asyncio.run(drive(args, sock, make))
    report({"model": args.model, "version": version, "socket": sock, "inputs": signature,
            "concurrency": args.concurrency}, rows, elapsed, args)
    return 0


if __name__ == "__main__":
    main_guard(lambda: run(parse_args()))
