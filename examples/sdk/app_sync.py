"""A device app, synchronous: `-n` requests to one model through the local agent with `edgefleet.sdk.Client`, each
run where the agent's offload policy says; per request where it ran, why and how long it took, then a summary.

    .venv/bin/python examples/sdk/app_sync.py MODEL [--socket PATH | --data-dir DIR] [-n 20] [--deadline-ms 20]
        [--tier realtime|background] [--batch 1] [--inputs data.npz] [--json]

Any model the agent serves: the inputs' names, dtypes and shapes come from the agent's own metadata
(`GET /v2/models/MODEL` on its unix socket), and each request carries random data of that signature or rows of
`--inputs`. The agent is found as the SDK finds it: `--socket`, else $EDGEFLEET_AGENT_SOCKET, else the
`unix_socket` in `{data_dir}/api.json` (`--data-dir`, $EDGEFLEET_DATA_DIR or /var/lib/edgefleet).

`latency_ms` is what this app waited (wall time around `infer`); `agent_latency_ms` the agent's own figure from
the answer's provenance. `--json` prints one object: the summary (`where`, `offloaded_share`, `reasons`,
`errors`, `latency_ms` p50/p95, `deadline_met`) and `per_request`.

Exit status: 0 when the run finished (a request the agent refused for its deadline, or could not send to the
cloud, is counted under `errors`); 1 when it cannot run (no agent, unknown model, inputs the model refuses: the
SDK's message says what to do); 2 for bad arguments.
"""

from __future__ import annotations

import argparse
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
    report,
    timed,
)

from edgefleet.sdk import Client


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = parser_for(__doc__)
    add_agent_args(parser)
    add_request_args(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    sock = find_agent(args)
    with Client(sock, timeout_s=args.timeout_s) as agent:
        signature, version = agent_signature(sock, args.model, args.version, args.timeout_s)
        make = input_maker(signature, args)
        if not args.json:
            deadline = "no deadline" if args.deadline_ms is None else f"deadline {args.deadline_ms:g} ms"
            print(f"{args.model} v{version} at {sock}, inputs {describe(signature)}: "
                  f"{plural(args.requests, 'request')}, {deadline}, tier {args.tier}")
        rows = []
        started = time.perf_counter()
        for i in range(args.requests):
            timed(i, partial(agent.infer, args.model, make(i), deadline_ms=args.deadline_ms, tier=args.tier,
                             version=args.version), rows, args)
        elapsed = time.perf_counter() - started
    report({"model": args.model, "version": version, "socket": sock, "inputs": signature}, rows, elapsed, args)
    return 0


if __name__ == "__main__":
    main_guard(lambda: run(parse_args()))
