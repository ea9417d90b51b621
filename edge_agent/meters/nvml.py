"""NVIDIA discrete GPUs through NVML: the driver's total-energy counter (millijoules), read at window edges.

Theory of operation: `nvmlDeviceGetTotalEnergyConsumption` returns the energy a GPU has used since the driver
loaded, in mJ, as an unsigned 64-bit count (no wrap in practice); Volta and newer have it. `read_j()` sums every
GPU's counter less its value when the meter opened. It measures the GPU board only (not the CPU, RAM or the host):
use it where inference runs on the GPU (CUDA or TensorRT execution provider). `nvidia-ml-py` (the `pynvml` module)
is optional and imported only when this meter is tried, so the agent's install stays lean:
`pip install 'edgefleet[nvml]'` adds it. `nvml` is a parameter so tests pass a stand-in module.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from edgefleet.edge_agent.meters.base import CumulativeMeter, EnergyMethod, MeterReadError, MeterScope, MeterUnavailable


def _import_pynvml() -> ModuleType:
    try:
        import pynvml  # optional dependency, imported only when this meter is tried
    except ImportError:
        raise MeterUnavailable("NVML needs the nvidia-ml-py package: `pip install nvidia-ml-py` (or the agent's "
                               "`nvml` extra), or choose another energy.meter") from None
    return pynvml


class NvmlMeter(CumulativeMeter):
    name = "nvml"
    method: EnergyMethod = "counter"
    scope: MeterScope = "component"

    def __init__(self, *, nvml: Any = None) -> None:
        super().__init__()
        self._nvml = nvml if nvml is not None else _import_pynvml()
        error = getattr(self._nvml, "NVMLError", Exception)
        try:
            self._nvml.nvmlInit()
            count = self._nvml.nvmlDeviceGetCount()
            self._handles = [self._nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            self._base_mj = [int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h)) for h in self._handles]
        except error as exc:
            raise MeterUnavailable(f"NVML cannot give GPU energy: {exc}; it needs the NVIDIA driver and a Volta or "
                                   "newer GPU, else choose another energy.meter") from None
        if not self._handles:
            raise MeterUnavailable("NVML sees no GPU; choose another energy.meter")
        self._error = error
        self.label = f"NVML total energy of {len(self._handles)} GPU(s) (GPU board only, not the host)"

    def _read_j(self) -> float:
        try:
            now = [int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h)) for h in self._handles]
        except self._error as exc:
            raise MeterReadError(f"NVML energy read failed: {exc}") from None
        return sum(max(0, n - b) for n, b in zip(now, self._base_mj)) / 1000.0

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except self._error:
            pass
