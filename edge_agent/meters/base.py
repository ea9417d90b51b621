"""The `EnergyMeter` seam: per-request meters (modelled) and window meters (RAPL, INA3221, Pi 5 PMIC, NVML).

Theory of operation: energy is attributed to inferences by busy time, never by spawning a process or reading a
sensor per inference. Every meter is bracketed around one busy interval, one request however many rows it
carries: `token = meter.start()` before the run, `joules = meter.stop(token, busy_s)` after it.

- A per-request meter (`method` "modelled") answers there: active watts x busy time. Telemetry records the joules
  with the request's rows and divides, so a window gives energy per request and per row alike.
- A window meter (`method` "counter" or "sampled") answers None there, so the hot path reads no sensor. It keeps
  a cumulative joule count instead (`read_j()`), which telemetry reads at every flush; a closed window's energy is
  the difference at its edges, shared among the window's models by busy time (`meters/attribution.py`). "counter"
  meters read a hardware energy counter (RAPL, NVML); "sampled" ones integrate a power sensor sampled by one
  background thread (`meters/sampler.py`: INA3221, the Pi 5 PMIC).

`source` labels every number we report: "measured" or "estimated", or "none" when there is no meter at all.
`scope` says what a window meter sees: "board" (the whole device's input: INA3221 VDD_IN), "partial" (the Pi 5
PMIC rails, which miss the 5 V side) or "component" (RAPL's CPU package, NVML's GPU): the device class's idle watts
are a whole-device figure, so they are subtracted only from a "board" meter's energy.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Any, Literal, Protocol, runtime_checkable

from edgefleet.edge_agent.errors import AgentError

EnergySource = Literal["measured", "estimated", "none"]
EnergyMethod = Literal["counter", "sampled", "modelled", ""]
MeterScope = Literal["board", "partial", "component", ""]


class MeterUnavailable(AgentError):
    """This meter cannot read on this device (no such sensor, no permission, no library); the message says why and
    what to do. Detection catches it and tries the next meter."""

    reason = "meter_unavailable"


class MeterPermissionDenied(MeterUnavailable):
    """The sensor is there but the agent's user may not read it (RAPL since Linux 5.10): the message has the fix.
    Logged as a warning even under "auto", where a missing sensor is only noted."""

    reason = "meter_permission"


class MeterReadError(AgentError):
    """A meter that worked failed one read (a file vanished, the tool timed out): that window gets no energy."""

    reason = "meter_read"


@runtime_checkable
class EnergyMeter(Protocol):
    name: str  # "modelled", "rapl", "ina3221", "pi5-pmic", "nvml", "none"
    source: EnergySource
    method: EnergyMethod

    def start(self) -> Any: ...

    def stop(self, token: Any, busy_s: float) -> float | None:
        """Joules spent over the interval started by `token` that lasted `busy_s` seconds; None if unknown."""
        ...


def is_window_meter(meter: object) -> bool:
    """A meter whose energy telemetry takes at window edges (`read_j`), not per request."""
    return getattr(meter, "method", "") in ("counter", "sampled") and callable(getattr(meter, "read_j", None))


class NullMeter:
    """No energy figure at all (source "none"): better than a made-up one."""

    name = "none"
    source: EnergySource = "none"
    method: EnergyMethod = ""
    hz: float | None = None

    def start(self) -> None:
        return None

    def stop(self, token: Any, busy_s: float) -> None:
        return None

    def close(self) -> None:
        return None


class CumulativeMeter(ABC):
    """Base of the window meters: per request nothing (the hot path stays two no-op calls), per window `read_j()`.

    Subclasses implement `_read_j()`: joules since the meter opened, never decreasing. `read_j` serializes reads
    (telemetry's flush and a bench may read from different threads) and wraps unexpected failures in
    `MeterReadError`, so one bad read costs one window's figure, never the agent."""

    name = "meter"
    source: EnergySource = "measured"
    method: EnergyMethod = "counter"
    scope: MeterScope = ""
    hz: float | None = None
    label = ""  # one line for logs and `edgefleet-agent status`: what the figure covers and what it misses

    def __init__(self) -> None:
        self._read_lock = threading.Lock()

    def start(self) -> None:
        return None

    def stop(self, token: Any, busy_s: float) -> None:
        return None

    def read_j(self) -> float:
        with self._read_lock:
            try:
                return self._read_j()
            except MeterReadError:
                raise
            except (OSError, ValueError) as exc:
                msg = f"{self.name} meter read failed: {exc}; the windows it bounds get no energy figure"
                raise MeterReadError(msg) from None

    @abstractmethod
    def _read_j(self) -> float:
        """The meter's cumulative joules since some fixed point; each reader says how it gets them."""

    def close(self) -> None:
        return None
