"""Energy meters behind the `EnergyMeter` protocol: modelled now; RAPL, INA3221 and NVML plug in as one file each."""

from edgefleet.edge_agent.meters.base import EnergyMeter, EnergySource, NullMeter
from edgefleet.edge_agent.meters.modelled import ModelledMeter

__all__ = ["EnergyMeter", "EnergySource", "ModelledMeter", "NullMeter"]
