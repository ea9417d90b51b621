"""Time for the agent behind one seam: wall time as an aware UTC datetime, and monotonic seconds.

Wall time stamps and checks documents (reported_at, telemetry windows, desired-state expiry, install back-offs);
monotonic time measures intervals (the HTTP poll while the link is down), so an NTP step of the wall clock neither
fires a poll early nor starves it. The daemon reads time only through a `Clock`; unit tests hand in a manual one
(`tests/edge_agent/fakes.py`) and move it forward instead of sleeping.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """Wall time, timezone-aware UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin that never goes backwards; only differences mean anything."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    def monotonic(self) -> float:
        return time.monotonic()
