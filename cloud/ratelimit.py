"""Per-device token buckets: a flood from one device cannot take the ingest from the others.

Theory of operation: each device has a bucket of `burst` tokens refilled at `rate` per second (a token is one
telemetry window, so a device that batches is not penalised for it). `take(key, n, now)` spends n tokens when the
bucket has them and answers False otherwise, spending nothing. No clock is read here: the caller passes `now`
(monotonic seconds). Buckets idle long enough to be full again are forgotten, so memory follows the devices that
are active, not every device ever seen.

A well-behaved agent sends one batch and waits for the cloud's ack before the next, so even draining a full outbox
after an outage it stays far below the defaults (settings `telemetry_device_windows_per_s`, 20,000, and a burst of
`telemetry_device_burst_s` seconds of it); what goes past them is a device that ignores the protocol.
"""

from __future__ import annotations

import threading


class TokenBuckets:
    def __init__(self, rate: float, burst: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError(f"rate and burst must be > 0, got {rate}, {burst}")
        self.rate = float(rate)
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, key: str, n: float, now: float) -> bool:
        with self._lock:
            tokens, at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate)
            ok = n <= tokens
            self._buckets[key] = (tokens - n if ok else tokens, now)
            if len(self._buckets) > 10_000:
                self._forget_full(now)
            return ok

    def _forget_full(self, now: float) -> None:
        full = [k for k, (tokens, at) in self._buckets.items() if tokens + (now - at) * self.rate >= self.burst]
        for k in full:
            del self._buckets[k]
