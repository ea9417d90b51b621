"""A simulated fleet for the reconnect-spread test and bench: N paho clients (`common.mqtt_client.JitteredClient`,
the class the agent and the cloud use) in one process, a real Mosquitto restarted on the same port, and when each
client got back.

    run_fleet(n, workdir, backoff_for) -> list[float]
        Starts a Mosquitto of its own, connects n clients (client i reconnects with `backoff_for(i)`), stops the
        broker (SIGTERM: every connection drops at the same instant, as in a broker restart), starts it again on the
        same port, and returns, per client, the seconds from the moment the broker listened again to that client's
        first successful CONNACK. Every wait is bounded.
    spread(instants, bucket_s) -> dict
        The shape of those instants: the largest fraction of the fleet in any one `bucket_s` bucket, how many
        buckets were used, p50, p95 and the span. Pure.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.common.mqtt_client import JitteredClient
from tests.harness import Mosquitto, wait_for


def run_fleet(n: int, workdir: Path, backoff_for: Callable[[int], Any], *, timeout_s: float = 120.0) -> list[float]:
    broker = Mosquitto(Path(workdir)).start()
    lock = threading.Lock()
    connected_at: list[list[float]] = [[] for _ in range(n)]
    clients: list[JitteredClient] = []

    def on_connect(i: int) -> Callable[..., None]:
        def record(client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
            if not rc.is_failure:
                with lock:
                    connected_at[i].append(time.monotonic())
        return record

    def all_have(k: int) -> bool:
        with lock:
            return all(len(times) >= k for times in connected_at)

    try:
        for i in range(n):
            client = JitteredClient(CallbackAPIVersion.VERSION2, client_id=f"fleet-{i}", protocol=mqtt.MQTTv311,
                                    backoff=backoff_for(i))
            client.on_connect = on_connect(i)
            client.connect_async(broker.host, broker.port, keepalive=60)
            client.loop_start()
            clients.append(client)
        wait_for(lambda: all_have(1), timeout_s, what=f"{n} clients to connect")
        broker.stop()
        broker.start()
        back_at = time.monotonic()
        wait_for(lambda: all_have(2), timeout_s, interval_s=0.2, what=f"{n} clients to reconnect")
        with lock:
            return [times[1] - back_at for times in connected_at]
    finally:
        for client in clients:
            client.disconnect()
        for client in clients:
            client.loop_stop()
        broker.stop()


def _quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def spread(instants: list[float], bucket_s: float) -> dict[str, float]:
    buckets = Counter(math.floor(t / bucket_s) for t in instants)
    ordered = sorted(instants)
    return {
        "bucket_s": bucket_s,
        "max_bucket_fraction": max(buckets.values()) / len(instants),
        "buckets_used": len(buckets),
        "p50_s": round(_quantile(ordered, 0.5), 3),
        "p95_s": round(_quantile(ordered, 0.95), 3),
        "span_s": round(ordered[-1] - ordered[0], 3),
    }
