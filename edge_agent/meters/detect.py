"""Which energy meter this device gets: the configured one, or the first in a stated order that reads.

Theory of operation: `choose_meter` tries readers in order and keeps the first that opens AND reads once; each
that cannot says why (`MeterUnavailable`: no such sensor, permission denied with the fix, no library), and every
reason is kept in the answer so the daemon logs them. Order for `energy.meter = "auto"`:

  1. ina3221   a Jetson's board input rail: the whole module, measured
  2. pi5-pmic  a Pi 5's PMIC rails: most of the board (the 5 V side missing)
  3. rapl      an x86 CPU's package (+ DRAM) counter: the CPU, not the board
  4. nvml      a discrete NVIDIA GPU's energy counter: the GPU board only
  5. modelled  active watts x busy time, "estimated" (needs the class's or the config's active_watts)
  6. none      no figure at all

Board-level sensors come before component counters because they see more of what an inference costs. When the
device class runs inference on a discrete GPU (a CUDA or TensorRT execution provider), nvml moves ahead of rapl:
the GPU is then where the energy goes. A configured meter that cannot read falls back to the modelled one with the
reason logged: a permission problem costs the measured figure, never the agent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgefleet.edge_agent.meters.attribution import MIN_MEASURED_WINDOW_S
from edgefleet.edge_agent.meters.base import (
    EnergyMeter,
    MeterPermissionDenied,
    MeterUnavailable,
    NullMeter,
    is_window_meter,
)
from edgefleet.edge_agent.meters.ina3221 import open_ina3221
from edgefleet.edge_agent.meters.modelled import ModelledMeter
from edgefleet.edge_agent.meters.nvml import NvmlMeter
from edgefleet.edge_agent.meters.pi5_pmic import open_pi5_pmic
from edgefleet.edge_agent.meters.rapl import RaplMeter
from edgefleet.edge_agent.meters.sysfs import ReadText, read_attr

if TYPE_CHECKING:
    from edgefleet.edge_agent.config import EnergyConfig
    from edgefleet.protos.bundle import DeviceClassInfo

log = logging.getLogger(__name__)

MEASURED_ORDER = ("ina3221", "pi5-pmic", "rapl", "nvml")
GPU_ORDER = ("ina3221", "nvml", "pi5-pmic", "rapl")
_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


@dataclass(frozen=True)
class Choice:
    meter: EnergyMeter
    tried: list[tuple[str, MeterUnavailable]] = field(default_factory=list)  # (name, why it was not taken)


@dataclass(frozen=True)
class Probes:
    """Where the readers look: the production defaults, or fixture trees and recorded output in tests."""

    sysfs_root: str = "/sys"
    read_text: ReadText = read_attr
    vcgencmd: Callable[[], str] | None = None  # None: run the real tool when it is on PATH
    nvml: Any = None  # None: import nvidia-ml-py when it is installed


def order_for(execution_providers: Sequence[str] = ()) -> tuple[str, ...]:
    return GPU_ORDER if any(p in _GPU_PROVIDERS for p in execution_providers) else MEASURED_ORDER


def open_measured(name: str, energy: EnergyConfig, probes: Probes, *, start: bool = True) -> EnergyMeter:
    """Open one measured meter by name; MeterUnavailable (with its reason and fix) when it cannot read here."""
    if name == "rapl":
        return RaplMeter(probes.sysfs_root, energy.rapl_domain, read_text=probes.read_text)
    if name == "ina3221":
        return open_ina3221(probes.sysfs_root, energy.ina3221_rail, energy.sample_hz, read_text=probes.read_text,
                            start=start)
    if name == "pi5-pmic":
        return open_pi5_pmic(energy.sample_hz, run=probes.vcgencmd, start=start)
    if name == "nvml":
        return NvmlMeter(nvml=probes.nvml)
    raise ValueError(f"unknown measured meter {name!r}")


def _fallback(active_watts: float | None, idle_watts: float | None) -> EnergyMeter:
    if active_watts is not None and active_watts > 0:
        return ModelledMeter(active_watts, idle_watts or 0.0)
    return NullMeter()


def choose_meter(energy: EnergyConfig, *, active_watts: float | None, idle_watts: float | None,
                 execution_providers: Sequence[str] = (), probes: Probes | None = None,
                 start: bool = True) -> Choice:
    """The meter `energy.meter` asks for, or with "auto" the first of `order_for(...)` that reads; the modelled
    meter (with `active_watts`) or none when nothing measured reads. `start` False keeps a sampled meter's thread
    stopped (tests drive `sample_once`)."""
    probes = probes or Probes(sysfs_root=energy.sysfs_root)
    wanted = energy.meter
    if wanted == "none":
        return Choice(NullMeter())
    if wanted == "modelled":
        why = MeterUnavailable("no active_watts in the config or the device class: set energy.active_watts")
        return Choice(_fallback(active_watts, idle_watts), [] if active_watts else [("modelled", why)])
    names = order_for(execution_providers) if wanted == "auto" else (wanted,)
    tried: list[tuple[str, MeterUnavailable]] = []
    for name in names:
        try:
            return Choice(open_measured(name, energy, probes, start=start), tried)
        except MeterUnavailable as exc:
            tried.append((name, exc))
    return Choice(_fallback(active_watts, idle_watts), tried)


def meter_for_class(energy: EnergyConfig, cls: DeviceClassInfo, *, window_s: float) -> tuple[EnergyMeter, float | None]:
    """The meter for a device of class `cls` and the idle watts its telemetry subtracts for a net figure (None: no
    net figure). The config's watts win over the class's. Every meter not taken is logged with its reason: quietly
    under "auto" (a sensor this board lacks is expected), loudly when a named meter is missing or a permission
    problem stands in the way, since those are for the operator to fix."""
    active = energy.active_watts or cls.active_watts
    idle = energy.idle_watts if energy.idle_watts is not None else cls.idle_watts
    choice = choose_meter(energy, active_watts=active, idle_watts=idle, execution_providers=cls.execution_providers)
    meter = choice.meter
    for name, why in choice.tried:
        loud = energy.meter != "auto" or isinstance(why, MeterPermissionDenied)
        log.log(logging.WARNING if loud else logging.INFO, "energy meter %s not used: %s", name, why)
    if isinstance(meter, ModelledMeter):
        idle_w: float | None = meter.idle_watts
    elif energy.idle_watts is not None:
        idle_w = energy.idle_watts
    else:  # the class's idle watts are a whole-device figure: subtracted only from a whole-board meter's energy
        idle_w = cls.idle_watts if getattr(meter, "scope", "") == "board" else None
    if is_window_meter(meter) and window_s < MIN_MEASURED_WINDOW_S:
        log.warning("telemetry.window_s = %g s is shorter than %g s: measured energy per window may be off by "
                    "up to 2 x tick / window of its power swing; use windows of a few seconds or more",
                    window_s, MIN_MEASURED_WINDOW_S)
    return meter, idle_w
