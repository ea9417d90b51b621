"""The cloud's telemetry confirmations as a link keeps them (link.py's contract): `publish_telemetry` waits for the
`TelemetryAck` that names its (epoch, seq), and an ack that comes when nobody waits (after the wait gave up, or for
a batch sent before a restart) is kept for `take_acked()`. One book for both links (link_mqtt.py, link_grpc.py):
they differ in how a batch goes out, not in how its confirmation comes back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from edgefleet.protos.messages import MessageError, TelemetryAck, parse_message

log = logging.getLogger(__name__)

Key = tuple[int, int]  # (epoch, seq)


class Waiter:
    """One wait: `event` set when it ends, `ok` True only when the cloud confirmed (a link that went down sets the
    event with `ok` False, so the daemon takes HTTP at once)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.ok = False

    def done(self, ok: bool) -> None:
        self.ok = self.ok or ok
        self.event.set()


class AckBook:
    def __init__(self, device_id: str, lock: threading.Lock | None = None) -> None:
        self.device_id = device_id
        self._lock = lock or threading.Lock()
        self._waiting: dict[Key, Waiter] = {}
        self._late: set[Key] = set()

    def handle(self, payload: bytes) -> None:
        """A TelemetryAck as it arrived: its seqs (stored) and refused ones (refused for good: then resending is
        useless, so they leave the outbox too) end their waits or join the late ones."""
        try:
            ack = parse_message(payload, TelemetryAck)
        except MessageError as exc:
            log.warning("ignored a malformed telemetry ack: %s", exc)
            return
        if ack.device_id != self.device_id:
            return
        if ack.refused:
            log.warning("the cloud refused telemetry batch(es) %s of epoch %d for good (%s); dropping them",
                        ack.refused[:10], ack.epoch, ack.reason or "no reason given")
        with self._lock:
            for seq in [*ack.seqs, *ack.refused]:
                key = (ack.epoch, seq)
                waiter = self._waiting.get(key)
                if waiter is not None:
                    waiter.done(True)
                else:
                    self._late.add(key)

    def take(self) -> list[Key]:
        """The late confirmations, each once."""
        with self._lock:
            out, self._late = sorted(self._late), set()
            return out

    def wait(self, key: Key, send: Callable[[Waiter], bool], timeout_s: float,
             monotonic: Callable[[], float] = time.monotonic) -> bool:
        """Send a batch (`send(waiter)`: False when it could not go out) and wait for its confirmation, `timeout_s`
        in all (the send's own wait included); True at once when it was confirmed already (a copy sent earlier was
        stored)."""
        deadline = monotonic() + timeout_s
        waiter = Waiter()
        with self._lock:
            if key in self._late:
                self._late.discard(key)
                return True
            self._waiting[key] = waiter
        try:
            if not send(waiter):
                return False
            waiter.event.wait(max(0.0, deadline - monotonic()))
            return waiter.ok
        finally:
            with self._lock:
                self._waiting.pop(key, None)
                if waiter.ok:
                    self._late.discard(key)

    def waiters(self) -> list[Waiter]:
        """Every wait now open (a link that goes down ends them with False)."""
        with self._lock:
            return list(self._waiting.values())


__all__ = ["AckBook", "Waiter"]
