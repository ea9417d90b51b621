"""200 clients after a real Mosquitto restart, reconnecting with the agent's defaults (retry_initial_s 1 s,
retry_max_s 300 s) through `JitteredClient`: their reconnect instants are spread, not bunched.

The shape is asserted, never wall time: no 100 ms bucket holds a quarter of the fleet and at least 8 buckets are
used (full jitter at 1 s puts about a tenth in each of the first second's ten). The old agent (one jitter rounded to
whole seconds, then paho's doubling) put the whole fleet into one bucket at 1 s; `bench/reconnect_spread.py`
measures both.
"""

from __future__ import annotations

import random

from edgefleet.common.backoff import Backoff
from tests.reconnect_fleet import run_fleet, spread

CLIENTS = 200
SEED = 7


def test_a_fleet_comes_back_spread_out_after_a_broker_restart(tmp_path):
    instants = run_fleet(CLIENTS, tmp_path / "mq",
                         lambda i: Backoff(1.0, 300.0, rand=random.Random(SEED * 1000 + i).random))
    assert len(instants) == CLIENTS
    shape = spread(instants, 0.1)
    assert shape["max_bucket_fraction"] <= 0.25, shape
    assert shape["buckets_used"] >= 8, shape
