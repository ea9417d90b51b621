"""Energy meters behind the `EnergyMeter` protocol, one file each: modelled (estimated), RAPL, INA3221, the Pi 5
PMIC and NVML (measured); `detect.choose_meter` picks one, `attribution` shares a window's energy by busy time."""

from edgefleet.edge_agent.meters.base import (
    CumulativeMeter,
    EnergyMeter,
    EnergyMethod,
    EnergySource,
    MeterPermissionDenied,
    MeterReadError,
    MeterUnavailable,
    NullMeter,
    is_window_meter,
)
from edgefleet.edge_agent.meters.detect import Choice, Probes, choose_meter
from edgefleet.edge_agent.meters.modelled import ModelledMeter

__all__ = ["Choice", "CumulativeMeter", "EnergyMeter", "EnergyMethod", "EnergySource", "MeterPermissionDenied",
           "MeterReadError", "MeterUnavailable", "ModelledMeter", "NullMeter", "Probes", "choose_meter",
           "is_window_meter"]
