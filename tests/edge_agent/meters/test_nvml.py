"""edge_agent/meters/nvml.py. nvidia-ml-py is not installed in the project's venv (it is an optional extra), so the
counter arithmetic runs against a stand-in module with NVML's names; the missing-library path is the real import."""

from __future__ import annotations

import sys

import pytest

from edgefleet.edge_agent.meters import MeterReadError, MeterUnavailable
from edgefleet.edge_agent.meters.nvml import NvmlMeter, _import_pynvml


class FakeNvml:
    """The five pynvml calls the meter makes, over per-GPU millijoule counters a test moves."""

    class NVMLError(Exception):
        pass

    def __init__(self, counters_mj: list[int], *, init_error: str | None = None) -> None:
        self.counters_mj = counters_mj
        self.init_error = init_error
        self.shut = False

    def nvmlInit(self) -> None:  # noqa: N802 - NVML's own names
        if self.init_error:
            raise self.NVMLError(self.init_error)

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802 - NVML's own names
        return len(self.counters_mj)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:  # noqa: N802 - NVML's own names
        return i

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:  # noqa: N802 - NVML's own names
        value = self.counters_mj[handle]
        if value < 0:
            raise self.NVMLError("Not Supported")
        return value

    def nvmlShutdown(self) -> None:  # noqa: N802 - NVML's own names
        self.shut = True


def test_total_energy_of_every_gpu_since_open():
    nvml = FakeNvml([1_000_000, 5_000])
    meter = NvmlMeter(nvml=nvml)
    assert (meter.name, meter.method, meter.scope, meter.read_j()) == ("nvml", "counter", "component", 0.0)
    nvml.counters_mj[:] = [1_250_000, 6_500]  # +250 J and +1.5 J
    assert meter.read_j() == pytest.approx(251.5)
    nvml.counters_mj[1] = -1
    with pytest.raises(MeterReadError, match="Not Supported"):
        meter.read_j()
    meter.close()
    assert nvml.shut


def test_no_driver_no_gpu_and_no_library_are_unavailable(monkeypatch):
    with pytest.raises(MeterUnavailable, match="NVIDIA driver"):
        NvmlMeter(nvml=FakeNvml([1], init_error="Driver Not Loaded"))
    with pytest.raises(MeterUnavailable, match="no GPU"):
        NvmlMeter(nvml=FakeNvml([]))
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml now raises ImportError, as without the package
    with pytest.raises(MeterUnavailable, match="pip install nvidia-ml-py"):
        _import_pynvml()
