"""paho's MQTT client with full-jitter reconnects: the one client class the agent's link and the cloud's bridge use.

Theory: paho's network thread (`loop_start`) reconnects by itself, waiting `_reconnect_wait()` between attempts:
min_delay, doubled up to max_delay, no jitter, and reset to min_delay by a successful CONNACK. A fleet that loses
its broker at one instant would come back at the same instants (the lockstep that issue 7 measured). This subclass
replaces only that wait: each delay is drawn by a `common.backoff.Backoff` (uniform up to the capped exponential),
and the backoff is reset where paho resets its own, on a successful CONNACK (paho clears `_reconnect_delay`).
Everything else (sockets, keepalive, the packet queue that `publish()` from other threads relies on) stays paho's,
but for one socket option: TCP_NODELAY on every connection (`reconnect`, which paho's loop calls for each one).
paho leaves Nagle's algorithm on, so a small packet written while an earlier one is unacknowledged waits for the
peer's delayed ACK: bench/transport.py measured ~40 ms more a telemetry round trip over MQTT than over gRPC (one
batch in flight per device, 95 ms against 55 with the agent's side alone set).

`_reconnect_wait` and `_reconnect_delay` are paho internals, stable through paho 2.x (pyproject pins <3);
tests/common/test_mqtt_client.py fails if paho stops calling the one or clearing the other.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import paho.mqtt.client as mqtt

from edgefleet.common.backoff import Backoff


class JitteredClient(mqtt.Client):
    """`paho.mqtt.client.Client` whose reconnect waits come from `backoff`; `waits` records them (for tests)."""

    def __init__(self, *args: Any, backoff: Backoff, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.backoff = backoff
        self.waits: list[float] = []
        self._wake = threading.Event()  # set by disconnect()/loop_stop(): a pending wait ends at once

    def _reconnect_wait(self) -> None:  # called by paho's loop_forever between attempts
        with self._reconnect_delay_mutex:
            if self._reconnect_delay is None:  # paho clears it on every successful CONNACK
                self.backoff.reset()
            delay = self.backoff.next_delay()
            self._reconnect_delay = delay
        self.waits.append(delay)
        self._wake.wait(delay)

    def reconnect(self) -> mqtt.MQTTErrorCode:
        rc = super().reconnect()
        sock = self.socket()
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):  # not a TCP socket (a websocket wrapper, a unix socket)
                pass
        return rc

    def loop_start(self) -> mqtt.MQTTErrorCode:
        self._wake.clear()
        return super().loop_start()

    def loop_stop(self) -> mqtt.MQTTErrorCode:
        self._wake.set()
        return super().loop_stop()

    def disconnect(self, *args: Any, **kwargs: Any) -> mqtt.MQTTErrorCode:
        self._wake.set()
        return super().disconnect(*args, **kwargs)


__all__ = ["JitteredClient"]
