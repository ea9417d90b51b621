"""edge_agent/meters/pi5_pmic.py against `vcgencmd pmic_read_adc` output recorded as a Pi 5 prints it."""

from __future__ import annotations

import pytest

from edgefleet.edge_agent.meters import MeterReadError, MeterUnavailable
from edgefleet.edge_agent.meters.pi5_pmic import open_pi5_pmic, parse_pmic_adc, run_vcgencmd
from tests.edge_agent.meters.conftest import FIXTURES

PI5 = (FIXTURES / "raspberry-pi-5" / "vcgencmd_pmic_read_adc.txt").read_text()
PI4 = (FIXTURES / "raspberry-pi-5" / "pi4_vcgencmd_pmic_read_adc.txt").read_text()


def test_the_rails_pair_their_current_and_voltage_lines():
    rails = parse_pmic_adc(PI5)
    assert len(rails.watts) == 12 and set(rails.volts_only) == {"EXT5V", "BATT"}  # volt-only lines add nothing
    assert rails.watts["VDD_CORE"] == pytest.approx(0.72313700 * 0.72070740)
    assert rails.watts["DDR_VDDQ"] == 0.0  # 0 A on that rail in this recording
    assert rails.volts_only["EXT5V"] == pytest.approx(5.10924)
    assert rails.total_w == pytest.approx(1.66038517, rel=1e-8)  # sum of V x A, worked by hand from the recording


def test_a_pi_without_the_pmic_is_unavailable_and_a_failing_tool_a_read_error():
    with pytest.raises(ValueError, match="Command not registered"):
        parse_pmic_adc(PI4)
    with pytest.raises(MeterUnavailable, match="Pi 5 with firmware"):
        open_pi5_pmic(run=lambda: PI4, start=False)
    with pytest.raises(MeterReadError, match="vcgencmd pmic_read_adc failed"):
        run_vcgencmd("/nonexistent/vcgencmd")


def test_the_meter_samples_the_sum_and_states_the_5v_gap():
    outputs = iter([PI5, PI5, PI5.replace("VDD_CORE_A current(7)=0.72313700A", "VDD_CORE_A current(7)=3.72313700A")])
    clock = iter([10.0, 10.25]).__next__
    meter = open_pi5_pmic(run=lambda: next(outputs), start=False)  # the first output is the probe at open
    meter._clock = clock  # drive the integration by hand: two samples 0.25 s apart
    assert meter.sample_once() and meter.sample_once()
    base = parse_pmic_adc(PI5).total_w
    assert meter.read_j() == pytest.approx((base + base + 3.0 * 0.72070740) / 2 * 0.25)
    assert (meter.name, meter.method, meter.scope) == ("pi5-pmic", "sampled", "partial")
    assert "misses the 5 V side" in meter.label
