"""edge_agent/meters/rapl.py against an Intel x86 powercap tree: domains, deltas, a wraparound, a permission error."""

from __future__ import annotations

import os

import pytest

from edgefleet.edge_agent.config import RAPL_DOMAINS
from edgefleet.edge_agent.meters import MeterPermissionDenied, MeterReadError, MeterUnavailable
from edgefleet.edge_agent.meters.rapl import DOMAIN_CHOICES, RaplMeter
from tests.edge_agent.meters.conftest import unprivileged_read, write

PKG_RANGE = 262143328850  # the fixture's max_energy_range_uj for the package, as an Intel client CPU reports it


def _energy(root, name):
    return root / "class" / "powercap" / name / "energy_uj"


def test_package_and_dram_are_read_and_nothing_else(tree):
    root = tree("intel-x86-rapl")
    meter = RaplMeter(root)  # default "package+dram"
    assert [d.name for d in meter.domains] == ["package-0", "intel-rapl:0/dram"]
    assert (meter.name, meter.source, meter.method, meter.scope) == ("rapl", "measured", "counter", "component")
    assert meter.read_j() == 0.0  # nothing spent since it opened
    write(_energy(root, "intel-rapl:0"), 73852912345 + 4_500_000)  # +4.5 J package
    write(_energy(root, "intel-rapl:0/intel-rapl:0:2"), 8421234567 + 700_000)  # +0.7 J dram
    write(_energy(root, "intel-rapl:0/intel-rapl:0:0"), 31241234567 + 9_000_000)  # core: inside package, not added
    write(_energy(root, "intel-rapl:1"), 123456789012 + 50_000_000)  # psys: not chosen
    write(root / "class" / "powercap" / "intel-rapl-mmio:0" / "energy_uj", 99)  # the MMIO duplicate: never read
    assert meter.read_j() == pytest.approx(5.2)
    write(_energy(root, "intel-rapl:0"), 73852912345 + 5_500_000)
    assert meter.read_j() == pytest.approx(6.2)  # cumulative


def test_package_only_and_psys_only(tree):
    root = tree("intel-x86-rapl")
    package, psys = RaplMeter(root, "package"), RaplMeter(root, "psys")
    assert [d.name for d in package.domains] == ["package-0"] and [d.name for d in psys.domains] == ["psys"]
    write(_energy(root, "intel-rapl:0"), 73852912345 + 2_000_000)
    write(_energy(root, "intel-rapl:1"), 123456789012 + 3_000_000)
    assert (package.read_j(), psys.read_j()) == (pytest.approx(2.0), pytest.approx(3.0))
    assert DOMAIN_CHOICES == RAPL_DOMAINS  # the config's choices are the meter's


def test_a_counter_wraparound_adds_the_range_not_a_negative(tree):
    root = tree("intel-x86-rapl")
    write(_energy(root, "intel-rapl:0"), PKG_RANGE - 1_000_000)  # 1 J short of the wrap
    meter = RaplMeter(root, "package")
    write(_energy(root, "intel-rapl:0"), 2_500_000)  # wrapped, then 2.5 J more
    assert meter.read_j() == pytest.approx(3.5)
    assert RaplMeter.delta_uj(10, 5, 100) == 95 and RaplMeter.delta_uj(5, 10, 100) == 5


def test_a_root_only_energy_uj_is_a_permission_error_with_the_fix(tree):
    root = tree("intel-x86-rapl")
    os.chmod(_energy(root, "intel-rapl:0"), 0o000)  # as Linux >= 5.10 ships it: 0400 root, unreadable to us
    with pytest.raises(MeterPermissionDenied) as caught:
        RaplMeter(root, read_text=unprivileged_read)
    message = str(caught.value)
    assert "permission denied" in message and "udev" in message and "chmod 0444" in message
    assert isinstance(caught.value, MeterUnavailable)  # detection falls back on it like any other


def test_no_rapl_and_a_vanished_counter(tree, tmp_path):
    with pytest.raises(MeterUnavailable, match="no RAPL domains.*modprobe"):
        RaplMeter(tmp_path)
    root = tree("intel-x86-rapl")
    for sub in ("intel-rapl:0:0", "intel-rapl:0:1", "intel-rapl:0:2"):
        (root / "class" / "powercap" / "intel-rapl:0" / sub / "name").write_text("core\n")  # no dram any more
    assert [d.name for d in RaplMeter(root).domains] == ["package-0"]  # no dram on this CPU: packages alone
    meter = RaplMeter(root, "package")
    _energy(root, "intel-rapl:0").unlink()  # the driver went away under us
    with pytest.raises(MeterReadError, match="no energy figure"):
        meter.read_j()
