"""The modelled meter: energy = active watts x busy time, labelled "estimated".

Theory of operation: on hardware without an energy counter the best honest figure is the device class's active
power (from the catalog, or the agent config) times the time the request kept the device busy (for a batched
request, the whole batch: telemetry divides by its rows). It over-counts
when other work shares the CPU and ignores idle power (spent whether or not we infer), so it is always reported as
`estimated` with meter name "modelled" and method "modelled"; fleet telemetry against measured devices recalibrates
the catalog's watts. `idle_watts` gives the idle-subtracted figure per request: (active - idle) x busy
(telemetry's `row_net_mj`), never an idle charge between inferences.
"""

from __future__ import annotations

from typing import Any

from edgefleet.edge_agent.meters.base import EnergyMethod, EnergySource


class ModelledMeter:
    name = "modelled"
    source: EnergySource = "estimated"
    method: EnergyMethod = "modelled"
    hz: float | None = None

    def __init__(self, active_watts: float, idle_watts: float = 0.0) -> None:
        if active_watts <= 0 or idle_watts < 0:
            raise ValueError(f"active_watts must be > 0 and idle_watts >= 0, got {active_watts}, {idle_watts}")
        self.active_watts = float(active_watts)
        self.idle_watts = float(idle_watts)

    def joules_for(self, busy_s: float) -> float:
        return self.active_watts * max(0.0, busy_s)

    def start(self) -> None:
        return None

    def stop(self, token: Any, busy_s: float) -> float:
        return self.joules_for(busy_s)

    def close(self) -> None:
        return None
