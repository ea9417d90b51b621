"""edge_agent/meters/ina3221.py against a Jetson Orin Nano hwmon tree and a Jetson Nano ina3221x tree (with a rail
that has no readings), and meters/sampler.py integrating them."""

from __future__ import annotations

import threading

import pytest

from edgefleet.edge_agent.meters import MeterPermissionDenied, MeterUnavailable
from edgefleet.edge_agent.meters.ina3221 import Ina3221Rails, open_ina3221
from edgefleet.edge_agent.meters.sampler import SampledMeter
from tests.edge_agent.meters.conftest import unprivileged_read, write

# The Orin fixture's rails: (mV, mA).
VDD_IN, CPU_GPU_CV, SOC = (5072, 1424), (5064, 392), (5072, 264)


def _w(*rails):
    return sum(mv * ma for mv, ma in rails) / 1e6


def test_orin_auto_takes_the_input_rail_alone(tree):
    rails = Ina3221Rails(tree("jetson-orin-nano-hwmon"))
    assert rails.all_labels == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]  # not the fan's hwmon, not in7 "sum of ..."
    assert [r.label for r in rails.rails] == ["VDD_IN"] and rails.read_w() == pytest.approx(_w(VDD_IN))


def test_orin_sum_a_named_rail_and_an_unknown_one(tree):
    root = tree("jetson-orin-nano-hwmon")
    assert Ina3221Rails(root, "sum").read_w() == pytest.approx(_w(VDD_IN, CPU_GPU_CV, SOC))
    assert Ina3221Rails(root, "VDD_SOC").read_w() == pytest.approx(_w(SOC))
    with pytest.raises(MeterUnavailable, match="'VDD_GPU' not found; this board has VDD_IN, VDD_CPU_GPU_CV, VDD_SOC"):
        Ina3221Rails(root, "VDD_GPU")
    # Whole board: VDD_IN alone. The sub-rails, or "sum" over VDD_IN and its sub-rails, are not.
    assert open_ina3221(root, start=False).scope == "board"
    assert open_ina3221(root, "sum", start=False).scope == "component"
    assert open_ina3221(root, "VDD_SOC", start=False).scope == "component"


def test_orin_a_disabled_input_channel_leaves_the_sum_of_the_others(tree):
    root = tree("jetson-orin-nano-hwmon")
    write(root / "class" / "hwmon" / "hwmon1" / "in1_enable", 0)
    rails = Ina3221Rails(root)
    assert [r.label for r in rails.rails] == ["VDD_CPU_GPU_CV", "VDD_SOC"]
    assert rails.read_w() == pytest.approx(_w(CPU_GPU_CV, SOC))


def test_nano_ina3221x_with_a_missing_rail(tree, caplog):
    root = tree("jetson-nano-ina3221x")
    rails = Ina3221Rails(root, "sum")
    assert rails.all_labels == ["POM_5V_IN", "POM_5V_GPU"]  # POM_5V_CPU is named but has no readings
    assert "POM_5V_CPU (channel 2) has no power, voltage or current reading; left out" in caplog.text
    assert rails.read_w() == pytest.approx((3385 + 199) / 1000)  # in_power*_input, mW
    assert Ina3221Rails(root).read_w() == pytest.approx(3.385)  # auto: POM_5V_IN, the module's input
    iio = root / "bus" / "i2c" / "drivers" / "ina3221x" / "6-0040" / "iio:device0"
    (iio / "in_power1_input").unlink()  # then power is voltage x current
    assert Ina3221Rails(root, "POM_5V_GPU").read_w() == pytest.approx(4992 * 40 / 1e6)


def test_unreadable_rails_are_a_permission_error_and_no_jetson_is_unavailable(tree, tmp_path):
    import os

    root = tree("jetson-orin-nano-hwmon")
    os.chmod(root / "class" / "hwmon" / "hwmon1" / "curr1_input", 0o000)
    with pytest.raises(MeterPermissionDenied, match="video"):
        Ina3221Rails(root, read_text=unprivileged_read)
    with pytest.raises(MeterUnavailable, match="no INA3221"):
        Ina3221Rails(tmp_path)


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_the_sampler_integrates_trapezoids_and_skips_failed_reads(tree):
    root = tree("jetson-orin-nano-hwmon")
    hwmon = root / "class" / "hwmon" / "hwmon1"
    clock = _Clock()
    rails = Ina3221Rails(root)
    meter = SampledMeter("ina3221", rails.read_w, 10.0, clock=clock, start=False)
    assert meter.sample_once() and meter.read_j() == 0.0  # one sample: no interval yet
    write(hwmon / "curr1_input", 2000)  # 5072 mV x 2000 mA = 10.144 W
    clock.t += 0.1
    assert meter.sample_once()
    first = (_w(VDD_IN) + 10.144) / 2 * 0.1
    assert meter.read_j() == pytest.approx(first)
    (hwmon / "curr1_input").unlink()  # one read fails: counted, skipped
    clock.t += 0.1
    assert not meter.sample_once() and meter.failures == 1
    write(hwmon / "curr1_input", 1000)  # 5.072 W; the trapezoid spans the gap
    clock.t += 0.1
    assert meter.sample_once()
    assert meter.read_j() == pytest.approx(first + (10.144 + 5.072) / 2 * 0.2)
    assert meter.samples == 3 and meter.hz == pytest.approx(2 / 0.3)  # achieved: 2 intervals in 0.3 s


def test_one_background_thread_samples_until_closed(tree):
    root = tree("jetson-orin-nano-hwmon")
    rails = Ina3221Rails(root)
    seen = threading.Event()
    calls = []

    def read_w() -> float:
        calls.append(threading.current_thread().name)
        if len(calls) >= 5:
            seen.set()
        return rails.read_w()

    def samplers() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name == "meter-ina3221"]

    meter = SampledMeter("ina3221", read_w, 100.0)
    assert seen.wait(10.0), "the sampler thread took no 5 samples in 10 s"
    assert samplers() == ["meter-ina3221"] and set(calls) == {"meter-ina3221"}  # one thread, every read on it
    meter.close()
    assert samplers() == [] and meter.read_j() > 0
    assert meter.label == ""  # open_ina3221 sets it; a bare SampledMeter has none
    assert open_ina3221(root, start=False).label == "INA3221 VDD_IN (whole module input)"
