"""edge_agent/meters/detect.py over the fixture boards, and the [energy] config keys that steer it."""

from __future__ import annotations

import os

import pytest

from edgefleet.edge_agent.config import EnergyConfig, config_from_dict
from edgefleet.edge_agent.errors import ConfigError
from edgefleet.edge_agent.meters import MeterPermissionDenied, ModelledMeter, NullMeter, Probes, choose_meter
from tests.edge_agent.meters.conftest import FIXTURES, unprivileged_read
from tests.edge_agent.meters.test_nvml import FakeNvml

PI5 = (FIXTURES / "raspberry-pi-5" / "vcgencmd_pmic_read_adc.txt").read_text()
PI4 = (FIXTURES / "raspberry-pi-5" / "pi4_vcgencmd_pmic_read_adc.txt").read_text()


def _choose(root, meter="auto", *, vcgencmd=lambda: PI4, nvml=None, read_text=None, providers=(), active=4.0):
    nvml = nvml if nvml is not None else FakeNvml([], init_error="Driver Not Loaded")
    probes = Probes(sysfs_root=str(root), vcgencmd=vcgencmd, nvml=nvml,
                    **({"read_text": read_text} if read_text else {}))
    return choose_meter(EnergyConfig(meter=meter), active_watts=active, idle_watts=1.0,
                        execution_providers=providers, probes=probes, start=False)


@pytest.mark.parametrize(("board", "expected", "misses"), [
    ("jetson-orin-nano-hwmon", "ina3221", []),
    ("jetson-nano-ina3221x", "ina3221", []),
    ("intel-x86-rapl", "rapl", ["ina3221", "pi5-pmic"]),
])
def test_auto_picks_the_first_meter_that_reads(tree, board, expected, misses):
    choice = _choose(tree(board))
    assert choice.meter.name == expected and [name for name, _ in choice.tried] == misses


def test_auto_on_a_pi5_and_on_a_board_with_nothing(tmp_path):
    assert _choose(tmp_path, vcgencmd=lambda: PI5).meter.name == "pi5-pmic"
    fallback = _choose(tmp_path)
    assert isinstance(fallback.meter, ModelledMeter) and fallback.meter.idle_watts == 1.0
    assert [name for name, _ in fallback.tried] == ["ina3221", "pi5-pmic", "rapl", "nvml"]
    assert isinstance(_choose(tmp_path, active=None).meter, NullMeter)  # no watts to model with: no figure
    assert _choose(tmp_path, "none", vcgencmd=lambda: PI5).meter.name == "none"
    assert _choose(tmp_path, "modelled", vcgencmd=lambda: PI5).meter.name == "modelled"


def test_a_gpu_class_puts_nvml_before_rapl(tree):
    root = tree("intel-x86-rapl")
    assert _choose(root, nvml=FakeNvml([10])).meter.name == "rapl"
    assert _choose(root, nvml=FakeNvml([10]), providers=["CUDAExecutionProvider"]).meter.name == "nvml"


def test_a_named_meter_that_is_denied_falls_back_with_the_fix(tree):
    root = tree("intel-x86-rapl")
    os.chmod(root / "class" / "powercap" / "intel-rapl:0" / "energy_uj", 0o000)
    choice = _choose(root, "rapl", read_text=unprivileged_read)
    assert isinstance(choice.meter, ModelledMeter)  # never a crash
    [(name, why)] = choice.tried
    assert name == "rapl" and isinstance(why, MeterPermissionDenied) and "udev" in str(why)
    # Under auto the same denial moves on to the next meter too.
    assert [n for n, _ in _choose(root, read_text=unprivileged_read).tried] == ["ina3221", "pi5-pmic", "rapl", "nvml"]


BASE = {"device_id": "pi-1", "device_class": "rpi5", "cloud_url": "http://c", "data_dir": "/tmp/x"}


def test_energy_config_keys_and_their_errors():
    config = config_from_dict({**BASE, "energy": {"meter": "rapl", "sample_hz": 50, "rapl_domain": "package",
                                                  "ina3221_rail": "VDD_SOC", "sysfs_root": "/host/sys"}})
    assert config.energy == EnergyConfig(meter="rapl", sample_hz=50.0, rapl_domain="package",
                                         ina3221_rail="VDD_SOC", sysfs_root="/host/sys")
    assert config_from_dict(BASE).energy.meter == "auto"
    for bad, message in [
        ({"meter": "rapll"}, "'energy.meter' is 'rapll' (did you mean 'rapl'?); use one of auto, rapl,"),
        ({"sample_hz": 5}, "'energy.sample_hz' must be between 10 and 1000"),
        ({"rapl_domain": "dram"}, "'energy.rapl_domain' is 'dram'; use one of package, package+dram, psys"),
        ({"ina3221_rail": " "}, "'energy.ina3221_rail' is empty"),
        ({"active_watts": 0}, "'energy.active_watts' must be > 0"),
        ({"sysfs_root": "sys"}, "'energy.sysfs_root' must be an absolute path"),
        ({"meter": 3}, "'energy.meter' must be a string"),
        ({"sampl_hz": 10}, "did you mean 'energy.sample_hz'"),
    ]:
        with pytest.raises(ConfigError) as caught:
            config_from_dict({**BASE, "energy": bad}, source="agent.toml")
        assert message in str(caught.value) and str(caught.value).startswith("agent.toml: ")
