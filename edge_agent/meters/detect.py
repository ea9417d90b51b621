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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgefleet.edge_agent.meters.base import EnergyMeter, MeterUnavailable, NullMeter
from edgefleet.edge_agent.meters.ina3221 import open_ina3221
from edgefleet.edge_agent.meters.modelled import ModelledMeter
from edgefleet.edge_agent.meters.nvml import NvmlMeter
from edgefleet.edge_agent.meters.pi5_pmic import open_pi5_pmic
from edgefleet.edge_agent.meters.rapl import RaplMeter
from edgefleet.edge_agent.meters.sysfs import ReadText, read_attr

if TYPE_CHECKING:
    from edgefleet.edge_agent.config import EnergyConfig

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
