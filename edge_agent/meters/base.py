"""The `EnergyMeter` seam: how many joules a request's busy interval cost, and how we know.

Theory of operation: energy is attributed to inferences by busy time, never by spawning a process or reading a
sensor per inference. A meter is bracketed around one busy interval, one request however many rows it carries:
`token = meter.start()` before the run, `joules = meter.stop(token, busy_s)` after it. The joules are the
request's; telemetry records them with the request's rows (its batch size) and divides, so a window gives energy
per request and per row (per inference) alike, and no meter needs to know the batch. A modelled meter ignores
the token and multiplies power by time; a measured one (RAPL energy counters, INA3221 rails, NVML) reads its
counter at start and stop and returns the difference, attributing overlap between concurrent runs by busy share.
`source` labels every number we report: "measured" or "estimated", or "none" when there is no meter at all.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

EnergySource = Literal["measured", "estimated", "none"]


@runtime_checkable
class EnergyMeter(Protocol):
    name: str  # "modelled", "rapl", "ina3221", ...
    source: EnergySource

    def start(self) -> Any: ...

    def stop(self, token: Any, busy_s: float) -> float | None:
        """Joules spent over the interval started by `token` that lasted `busy_s` seconds; None if unknown."""
        ...


class NullMeter:
    """No energy figure at all (source "none"): better than a made-up one."""

    name = "none"
    source: EnergySource = "none"

    def start(self) -> None:
        return None

    def stop(self, token: Any, busy_s: float) -> None:
        return None
