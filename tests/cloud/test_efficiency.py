"""cloud/efficiency.py: the pure core, table-driven: figures from sums, the label rule, costs, offload and ratios."""

from __future__ import annotations

import pytest

from edgefleet.cloud import efficiency as core
from edgefleet.cloud.efficiency import Prices, Slice

PRICES = Prices(energy_per_kwh=0.30, offload_per_million=1.0)


def local(rows: int, mj: float, source: str = "estimated", *, device: str = "d1", cls: str = "rpi4",
          version: int = 1, where: str = "local", ms: float = 2.0, p95: float = 5.0) -> Slice:
    """`rows` single-row requests of `mj` mJ and `ms` ms each."""
    metered = rows if source in ("measured", "estimated") else 0
    return Slice(device_id=device, device_class=cls, model="m", version=version, where=where, energy_source=source,
                 requests=rows, rows=rows, energy_rows=metered, energy_mj=mj * metered, latency_rows=rows,
                 latency_ms=ms * rows, p95_requests=rows, p95_ms=p95 * rows)


@pytest.mark.parametrize(("mj", "per_kwh", "cost"), [
    (3.6, 1e9, 3.6 * 1e6 / 3.6e9 * 0.30),  # 3.6 mJ: a billion per kWh, 0.0003 per million at 0.30/kWh
    (0.59, 3.6e9 / 0.59, 0.59e6 / 3.6e9 * 0.30),
    (3.6e9, 1.0, 1e6 * 0.30),  # a kWh per inference
])
def test_energy_figures_from_mj_per_inference(mj, per_kwh, cost):
    assert core.inferences_per_kwh(mj) == pytest.approx(per_kwh)
    assert core.energy_cost_per_million(mj, 0.30) == pytest.approx(cost)
    assert core.cost_per_million(mj, 0.0, PRICES) == pytest.approx(cost)


def test_no_or_zero_energy_gives_no_figure_rather_than_infinity():
    assert core.inferences_per_kwh(None) is None and core.inferences_per_kwh(0.0) is None
    assert core.energy_cost_per_million(None, 0.3) is None
    assert core.cost_per_million(None, 0.5, PRICES) is None  # the cloud's half alone would understate the cost


@pytest.mark.parametrize(("measured", "estimated", "label"), [
    (0, 0, "none"), (10, 0, "measured"), (0, 10, "estimated"), (1, 999, "mixed"), (999, 1, "mixed"),
])
def test_label_rule(measured, estimated, label):
    assert core.energy_label(measured, estimated) == label


def test_mixed_sources_are_labelled_mixed_with_the_measured_share_and_weighted_by_rows():
    f = core.figures(core.total([local(300, 1.0, "measured"), local(100, 5.0, "estimated")]), PRICES)
    assert f.energy_source == "mixed" and f.measured_share == pytest.approx(0.75)
    assert f.mj_per_inference == pytest.approx((300 * 1.0 + 100 * 5.0) / 400)  # 2.0: rows-weighted, not 3.0
    assert f.inferences_per_kwh == pytest.approx(3.6e9 / 2.0)
    assert f.energy_kwh == pytest.approx(800 / 3.6e9)
    assert f.energy_cost == pytest.approx(800 / 3.6e9 * 0.30)


def test_windows_without_energy_count_as_inferences_but_not_in_energy():
    f = core.figures(core.total([local(100, 2.0, "measured"), local(900, 0.0, "none")]), PRICES)
    assert (f.inferences, f.metered_inferences) == (1000, 100)
    assert f.mj_per_inference == pytest.approx(2.0) and f.energy_source == "measured"


def test_offload_adds_its_share_of_the_cloud_price_and_keeps_the_devices_energy():
    # 750 local inferences at 4 mJ, 250 forwarded to the cloud drawing 1 mJ each on the device.
    f = core.figures(core.total([local(750, 4.0), local(250, 1.0, where="cloud", p95=80.0)]), PRICES)
    assert (f.inferences, f.offloaded, f.offload_share) == (1000, 250, 0.25)
    mj = (750 * 4.0 + 250 * 1.0) / 1000
    assert f.mj_per_inference == pytest.approx(mj)
    assert f.cost_per_million == pytest.approx(mj * 1e6 / 3.6e9 * 0.30 + 0.25 * 1.0)
    assert f.offload_cost == pytest.approx(250 / 1e6 * 1.0)
    assert f.total_cost == pytest.approx(f.energy_cost + f.offload_cost)
    assert f.p95_ms == pytest.approx(5.0)  # local inferences only: an offload's p95 is the network's


def test_merge_groups_by_key_and_sums_exactly():
    slices = [local(10, 1.0, device="a"), local(30, 3.0, device="b"), local(60, 6.0, device="c", cls="x86-cpu")]
    by_class = core.merge(slices, lambda s: s.device_class)
    assert list(by_class) == ["rpi4", "x86-cpu"]
    assert by_class["rpi4"].rows == 40 and by_class["rpi4"].energy_mj == pytest.approx(100.0)
    assert core.total(slices).rows == sum(by_class[k].rows for k in by_class)


def test_empty_totals_give_an_empty_view():
    f = core.figures(core.Totals(), PRICES)
    assert f.inferences == 0 and f.mj_per_inference is None and f.offload_share is None
    assert f.energy_source == "none" and f.cost_per_million is None and f.total_cost == 0.0


@pytest.mark.parametrize(("teacher", "edge", "higher", "expected"), [
    (10.0, 0.5, False, 20.0), (1e8, 2e9, True, 20.0), (None, 1.0, False, None), (1.0, 0.0, False, None),
])
def test_times_better(teacher, edge, higher, expected):
    assert core.times_better(teacher, edge, higher_is_better=higher) == expected


@pytest.mark.parametrize(("labels", "expected"), [
    (("measured", "measured"), "measured"), (("estimated", "none"), "estimated"), (("measured", "estimated"), "mixed"),
    (("mixed", "measured"), "mixed"), (("none",), "none"),
])
def test_weaker_label_of_a_blend(labels, expected):
    assert core.weaker(*labels) == expected
