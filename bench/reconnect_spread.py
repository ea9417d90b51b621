"""When does a fleet come back after a broker restart? The old agent's backoff against full jitter (issue 7).

    .venv/bin/python bench/reconnect_spread.py [--clients 200] [--seed 7] [--json]

Runs `tests/reconnect_fleet.py`: N paho clients in one process (`JitteredClient`, what the agent and the cloud use),
a real Mosquitto stopped and started again on the same port, and, per client, the seconds from the broker
listening again to its first successful CONNACK. Two policies, both at the agent's defaults (retry_initial_s 1 s,
retry_max_s 300 s):

  old           what edge_agent/link_mqtt.py did: one jitter rounded to whole seconds (so 1 s), then paho's
                doubling from there, the same for every client
  full_jitter   common/backoff.py: uniform in [0, min(300, 1 * 2**attempt)), seeded per client

Prints, per policy, the largest fraction of the fleet in one 100 ms bucket and in one 1 s bucket, the buckets used,
p50, p95 and the span. Needs mosquitto (apt-get install mosquitto). Timings depend on the machine; the shape does not.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgefleet.common.backoff import Backoff  # noqa: E402
from tests.reconnect_fleet import run_fleet, spread  # noqa: E402

INITIAL_S, MAX_S = 1.0, 300.0


class OldPolicy:
    """The agent before issue 7: `max(1, int(round(initial * (1 + random() * 0.5))))` once, then paho doubling."""

    def __init__(self, rand: random.Random) -> None:
        self.first = max(1, int(round(INITIAL_S * (1 + rand.random() * 0.5))))
        self.attempt = 0

    def next_delay(self) -> float:
        delay = min(MAX_S, self.first * 2**self.attempt)
        self.attempt += 1
        return float(delay)

    def reset(self) -> None:
        self.attempt = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    policies = {
        "old": lambda i: OldPolicy(random.Random(args.seed * 1000 + i)),
        "full_jitter": lambda i: Backoff(INITIAL_S, MAX_S, rand=random.Random(args.seed * 1000 + i).random),
    }
    result: dict[str, object] = {"clients": args.clients, "seed": args.seed, "retry_initial_s": INITIAL_S,
                                 "retry_max_s": MAX_S, "machine": f"{platform.machine()} {platform.processor()}",
                                 "python": platform.python_version(), "policies": {}}
    for name, backoff_for in policies.items():
        with tempfile.TemporaryDirectory() as tmp:
            instants = run_fleet(args.clients, Path(tmp), backoff_for)
        result["policies"][name] = {"bucket_100ms": spread(instants, 0.1), "bucket_1s": spread(instants, 1.0)}
        print(f"{name}: done", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.clients} clients, seed {args.seed}, retry {INITIAL_S:g} s .. {MAX_S:g} s")
    print(f"{'policy':<12} {'max/100ms':>10} {'max/1s':>8} {'buckets':>8} {'p50 s':>7} {'p95 s':>7} {'span s':>7}")
    for name, shape in result["policies"].items():
        fine, coarse = shape["bucket_100ms"], shape["bucket_1s"]
        print(f"{name:<12} {fine['max_bucket_fraction']:>10.0%} {coarse['max_bucket_fraction']:>8.0%} "
              f"{fine['buckets_used']:>8} {fine['p50_s']:>7} {fine['p95_s']:>7} {fine['span_s']:>7}")


if __name__ == "__main__":
    main()
