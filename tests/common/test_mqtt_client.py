"""common/mqtt_client.py: paho's own network thread waits the `Backoff`'s delays between reconnects, starts over
after a successful CONNACK, and a stop cuts a long wait short. Real sockets, a real Mosquitto."""

from __future__ import annotations

import random
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.common.backoff import Backoff
from edgefleet.common.mqtt_client import JitteredClient
from tests.harness import Mosquitto, free_port, wait_for


def _client(backoff: Backoff) -> JitteredClient:
    return JitteredClient(CallbackAPIVersion.VERSION2, client_id=f"jitter-{random.random()}",
                          protocol=mqtt.MQTTv311, backoff=backoff)


def test_paho_waits_the_backoffs_delays_between_attempts():
    seed = 11
    twin = Backoff(0.05, 0.4, rand=random.Random(seed).random)
    client = _client(Backoff(0.05, 0.4, rand=random.Random(seed).random))
    client.connect_async("127.0.0.1", free_port())  # nothing listens there: every attempt fails
    client.loop_start()
    try:
        wait_for(lambda: len(client.waits) >= 6, 20, what="six reconnect waits")
    finally:
        client.disconnect()
        client.loop_stop()
    assert client.waits[:6] == [twin.next_delay() for _ in range(6)]
    assert len({round(w, 6) for w in client.waits[:6]}) == 6  # not paho's whole-second doubling


def test_the_backoff_starts_over_after_a_successful_connect(tmp_path):
    broker = Mosquitto(tmp_path / "mq").start()
    client = _client(Backoff(0.05, 0.8, rand=lambda: 0.999))  # every delay is its whole window
    connects: list[int] = []
    client.on_connect = lambda c, u, f, rc, p: connects.append(len(client.waits))
    client.connect_async(broker.host, broker.port)
    client.loop_start()
    try:
        wait_for(lambda: connects, 10, what="the first connect")
        for outage in (1, 2):
            broker.stop()
            wait_for(lambda: len(client.waits) >= connects[-1] + 3, 20, what=f"three waits in outage {outage}")
            broker.start()
            wait_for(lambda n=outage + 1: len(connects) == n, 20, what=f"the reconnect after outage {outage}")
    finally:
        client.disconnect()
        client.loop_stop()
        broker.stop()
    second_outage = client.waits[connects[1]:connects[2]]
    assert second_outage[:3] == [0.05 * 0.999, 0.1 * 0.999, 0.2 * 0.999]  # from the first window again


def test_a_stop_ends_a_long_wait_at_once():
    client = _client(Backoff(30.0, 60.0, rand=lambda: 0.999))
    client.connect_async("127.0.0.1", free_port())
    client.loop_start()
    wait_for(lambda: client.waits, 10, what="a 30 s wait to begin")
    stopped = threading.Event()
    started = time.monotonic()

    def stop() -> None:
        client.disconnect()
        client.loop_stop()
        stopped.set()

    threading.Thread(target=stop, daemon=True).start()
    assert stopped.wait(5), "loop_stop waited out the 30 s backoff"
    assert time.monotonic() - started < 5


def test_every_connection_turns_nagle_off_also_after_a_reconnect(tmp_path):
    """TCP_NODELAY on the first connection and on the one after the broker came back (paho's loop reconnects)."""
    import socket

    broker = Mosquitto(tmp_path / "mq").start()
    client = _client(Backoff(0.05, 0.2, rand=random.Random(3).random))
    connects: list[int] = []
    client.on_connect = lambda c, u, f, rc, p: connects.append(
        client.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    client.connect_async(broker.host, broker.port)
    client.loop_start()
    try:
        wait_for(lambda: connects, 10, what="the first connect")
        broker.stop()
        broker.start()
        wait_for(lambda: len(connects) == 2, 20, what="the reconnect")
    finally:
        client.disconnect()
        client.loop_stop()
        broker.stop()
    assert connects == [1, 1]
