"""edge_agent/meters/attribution.py: a window's energy shared by busy time (gross and net), and the edge ledger."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from edgefleet.edge_agent.meters.attribution import Attributed, EnergyLedger, Share, attribute

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


@pytest.mark.parametrize(("energy_j", "window_s", "idle_w", "shares", "expected"), [
    # 60 J over 10 s at 2 W idle: net 40 J. Model a busy 3 s (300 rows, 3 requests), b 1 s (10 rows, 10 requests).
    (60.0, 10.0, 2.0, [Share(3.0, 3, 300), Share(1.0, 10, 10)],
     [Attributed(mean_mj=15_000.0, row_mj=150.0, row_net_mj=100.0),
      Attributed(mean_mj=1_500.0, row_mj=1_500.0, row_net_mj=1_000.0)]),
    # Idle above what was measured: net clamps at 0, never negative.
    (5.0, 10.0, 2.0, [Share(1.0, 1, 1)], [Attributed(5_000.0, 5_000.0, 0.0)]),
    # No idle power known: no net figure.
    (1.0, 10.0, None, [Share(1.0, 1, 2)], [Attributed(1_000.0, 500.0, None)]),
    # Every latency rounded to 0: shared by rows; a share without successful requests gets nothing.
    (3.0, 1.0, 0.0, [Share(0.0, 1, 1), Share(0.0, 2, 2), Share(0.0, 0, 0)],
     [Attributed(1_000.0, 1_000.0, 1_000.0), Attributed(1_000.0, 1_000.0, 1_000.0), None]),
    # A negative reading (a meter glitch) is no energy, not a credit.
    (-4.0, 1.0, None, [Share(1.0, 1, 1)], [Attributed(0.0, 0.0, None)]),
])
def test_attribute(energy_j, window_s, idle_w, shares, expected):
    got = attribute(energy_j, window_s, idle_w, shares)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        if e is None:
            assert g is None
            continue
        assert g.mean_mj == pytest.approx(e.mean_mj) and g.row_mj == pytest.approx(e.row_mj)
        assert (g.row_net_mj is None) == (e.row_net_mj is None)
        if e.row_net_mj is not None:
            assert g.row_net_mj == pytest.approx(e.row_net_mj)


def test_the_shares_add_up_to_the_window():
    shares = [Share(0.3, 7, 70), Share(1.9, 2, 9), Share(0.05, 1, 1)]
    got = attribute(12.5, 60.0, 0.1, shares)
    assert sum(a.row_mj * s.rows for a, s in zip(got, shares)) == pytest.approx(12_500.0)
    assert sum(a.row_net_mj * s.rows for a, s in zip(got, shares)) == pytest.approx(12_500.0 - 6_000.0)
    assert all(a.row_net_mj <= a.row_mj <= a.mean_mj for a in got)


def test_the_ledger_interpolates_edges_and_clips_to_its_readings():
    ledger = EnergyLedger()
    assert ledger.between(T0, T0 + timedelta(seconds=60)) is None  # nothing read yet
    for s, j in ((-0.5, 100.0), (0.5, 101.0), (59.5, 160.0), (60.5, 170.0)):
        ledger.add(T0 + timedelta(seconds=s), j)
    # At 0 s: halfway from 100 to 101; at 60 s: halfway from 160 to 170.
    joules, seconds = ledger.between(T0, T0 + timedelta(seconds=60))
    assert (joules, seconds) == (pytest.approx(165.0 - 100.5), 60.0)
    # A window force-closed at 59.5 s, or begun before the first reading, is measured over what is covered.
    assert ledger.between(T0 + timedelta(seconds=30), T0 + timedelta(seconds=90)) == (
        pytest.approx(170.0 - 130.5), pytest.approx(30.5))  # 30 s: 101 J + 29.5 s at 1 W
    ledger.add(T0 + timedelta(seconds=60.5), 999.0)  # same instant again: the first reading stands
    ledger.add(T0 + timedelta(seconds=61), 1.0)  # a counter going backwards is held, not a negative delta
    assert ledger.between(T0 + timedelta(seconds=60.5), T0 + timedelta(seconds=61)) == (0.0, 0.5)
    ledger.prune(T0 + timedelta(seconds=60))  # keep the reading at or before the oldest open window's start on
    assert len(ledger) == 3 and ledger.between(T0 + timedelta(seconds=59.5), T0 + timedelta(seconds=60))[0] == 5.0
    ledger.prune(None)
    assert len(ledger) == 1
