"""common/backoff.py: the full-jitter rule, table-driven, and the per-link `Backoff` state."""

from __future__ import annotations

import random

import pytest

from edgefleet.common.backoff import Backoff, backoff_ceiling, full_jitter_delay


@pytest.mark.parametrize(("attempt", "initial_s", "max_s", "ceiling"), [
    (0, 1.0, 60.0, 1.0),
    (1, 1.0, 60.0, 2.0),
    (5, 1.0, 60.0, 32.0),
    (6, 1.0, 60.0, 60.0),  # 64 capped
    (10_000, 1.0, 60.0, 60.0),  # no overflow however long a link stays down
    (3, 0.2, 1.0, 1.0),
    (0, 0.2, 1.0, 0.2),
])
def test_ceiling_doubles_and_caps(attempt, initial_s, max_s, ceiling):
    assert backoff_ceiling(attempt, initial_s=initial_s, max_s=max_s) == pytest.approx(ceiling)


@pytest.mark.parametrize(("draw", "delay"), [(0.0, 0.0), (0.25, 2.0), (0.5, 4.0), (0.999, 7.992)])
def test_full_jitter_is_the_draw_times_the_window(draw, delay):
    assert full_jitter_delay(3, initial_s=1.0, max_s=60.0, draw=draw) == pytest.approx(delay)


@pytest.mark.parametrize("kwargs", [
    {"attempt": -1, "initial_s": 1.0, "max_s": 2.0, "draw": 0.5},
    {"attempt": 0, "initial_s": 0.0, "max_s": 2.0, "draw": 0.5},
    {"attempt": 0, "initial_s": 3.0, "max_s": 2.0, "draw": 0.5},
    {"attempt": 0, "initial_s": 1.0, "max_s": 2.0, "draw": 1.0},
    {"attempt": 0, "initial_s": 1.0, "max_s": 2.0, "draw": -0.1},
])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        full_jitter_delay(**kwargs)


def test_the_first_delay_is_spread_over_the_whole_first_window():
    # Issue 7: the old agent rounded its "jittered" first delay to whole seconds, always 1 at the default 1 s, so a
    # fleet came back in lockstep. Full jitter at the default must take many values across [0, 1).
    delays = [Backoff(1.0, 300.0, rand=random.Random(seed).random).next_delay() for seed in range(200)]
    assert all(0.0 <= d < 1.0 for d in delays)
    assert len({round(d, 3) for d in delays}) > 150
    tenths = [sum(1 for d in delays if k / 10 <= d < (k + 1) / 10) for k in range(10)]
    assert max(tenths) <= 40  # about 20 per tenth; never most of them in one


def test_backoff_windows_double_per_failure_and_reset_starts_over():
    b = Backoff(1.0, 8.0, rand=lambda: 0.999)
    assert [round(b.next_delay(), 2) for _ in range(6)] == [1.0, 2.0, 4.0, 7.99, 7.99, 7.99]
    b.reset()
    assert b.next_delay() == pytest.approx(0.999)


def test_a_seeded_backoff_repeats_and_two_seeds_differ():
    def run(seed: int) -> list[float]:
        b = Backoff(1.0, 60.0, rand=random.Random(seed).random)
        return [b.next_delay() for _ in range(8)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_a_bad_pair_is_refused_at_construction():
    with pytest.raises(ValueError, match="initial_s <= max_s"):
        Backoff(10.0, 1.0)
