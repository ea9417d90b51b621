"""Reconnect and retry delays with full jitter, the one rule every link of the cloud and the agent follows.

Theory (AWS Architecture Blog, "Exponential Backoff And Jitter", 2015): after a shared failure (a broker restart,
a cloud outage) every client fails at the same instant. Plain doubling (1, 2, 4, ... s) keeps them in lockstep, and
a small multiplicative jitter (x1.0-1.2, or one rounded to whole seconds) barely spreads them. "Full jitter" draws
each delay uniformly from [0, min(cap, base * 2**attempt)): the expected wait still doubles, but the clients'
attempts spread over the whole window, and the blog's simulations show it does the least total work of the
variants it compares.

`full_jitter_delay` is the pure rule (the random draw is passed in); `Backoff` keeps the attempt count for one link
and is reset when the link is up again. Nothing here sleeps or reads a clock.
"""

from __future__ import annotations

import random
from collections.abc import Callable

# 2**30: far past any cap; keeps `base * 2**attempt` finite however long a link stays down.
_MAX_EXPONENT = 30


def backoff_ceiling(attempt: int, *, initial_s: float, max_s: float) -> float:
    """The capped exponential window for `attempt` (0 for the first retry): min(max_s, initial_s * 2**attempt)."""
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, not {attempt}")
    if initial_s <= 0 or max_s < initial_s:
        raise ValueError(f"need 0 < initial_s <= max_s, got initial_s={initial_s}, max_s={max_s}")
    return min(max_s, initial_s * float(2 ** min(attempt, _MAX_EXPONENT)))


def full_jitter_delay(attempt: int, *, initial_s: float, max_s: float, draw: float) -> float:
    """Full jitter: `draw` (uniform in [0, 1)) times the capped exponential window for `attempt`."""
    if not 0.0 <= draw < 1.0:
        raise ValueError(f"draw must be in [0, 1), not {draw}")
    return draw * backoff_ceiling(attempt, initial_s=initial_s, max_s=max_s)


class Backoff:
    """One link's retry state: `next_delay()` after each failure, `reset()` once it is up again.

    `rand` defaults to a private `random.Random()` seeded by the OS, so two processes started together draw
    different delays; tests and the bench pass a seeded one (`random.Random(seed).random`).
    """

    def __init__(self, initial_s: float, max_s: float, *, rand: Callable[[], float] | None = None) -> None:
        backoff_ceiling(0, initial_s=initial_s, max_s=max_s)  # refuse a bad pair now, not at the first failure
        self.initial_s = initial_s
        self.max_s = max_s
        self._rand = rand if rand is not None else random.Random().random
        self.attempt = 0

    def next_delay(self) -> float:
        delay = full_jitter_delay(self.attempt, initial_s=self.initial_s, max_s=self.max_s, draw=self._rand())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


__all__ = ["Backoff", "backoff_ceiling", "full_jitter_delay"]
