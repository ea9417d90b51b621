"""edge_agent/outbox.py on real files: epochs, acks by epoch, attempted marks, the merge policy of a full outbox (sums
exact, windows valid, attempted batches untouched, drops last and counted), and crashes in the middle of a merge.

Windows are made by the agent's own `_Window` from raw requests, so "exact" is checked against the ground truth: one
window recorded over all the requests of the windows merged."""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet.cloud.store import Store
from edgefleet.edge_agent import outbox as outbox_mod
from edgefleet.edge_agent.outbox import Outbox
from edgefleet.edge_agent.outbox_merge import Tally, merge_windows
from edgefleet.edge_agent.telemetry import Telemetry, _Window
from edgefleet.protos.limits import MAX_WINDOW_S
from edgefleet.protos.messages import TelemetryBatch, TelemetryWindow, parse_message

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)  # a multiple of 60 s since the epoch
BIG = 1 << 30


class Crash(BaseException):
    """The process dying at this point (a BaseException: nothing in the outbox may catch it)."""


Request = tuple[float, bool, "float | None", int]  # latency ms, ok, energy mJ, rows


def record(requests: list[Request], start_s: float, length_s: float = 60.0, *, model: str = "m", version: int = 1,
           source: str = "estimated", meter: str = "modelled") -> TelemetryWindow:
    w = _Window(model, version, "local", T0 + timedelta(seconds=start_s), T0 + timedelta(seconds=start_s + length_s))
    for latency, ok, energy, rows in requests:
        w.add(latency, ok, energy, source, meter, rows)
    return w.close()


def requests(rng: random.Random, n: int, *, metered: bool = True, error_rate: float = 0.2) -> list[Request]:
    return [(rng.uniform(0.1, 200.0), rng.random() >= error_rate, rng.uniform(0.5, 900.0) if metered else None,
             rng.choice((1, 1, 3, 64, 1200))) for _ in range(n)]


def originals(b: TelemetryBatch) -> int:
    return b.merged_windows or len(b.windows)


def tally(batches: list[TelemetryBatch]) -> Tally:
    return Tally.of(w for b in batches for w in b.windows)


def ok_sums(windows: list[TelemetryWindow]) -> tuple[int, float, float]:
    """(successful requests, their busy ms, their energy mJ): what every mean is a ratio of."""
    return (sum(w.count - w.errors for w in windows), sum((w.mean_ms or 0.0) * (w.count - w.errors) for w in windows),
            sum((w.mean_mj or 0.0) * (w.count - w.errors) for w in windows))


# -- epoch -----------------------------------------------------------------------------------------------------


def test_the_epoch_is_made_once_kept_and_in_every_batch(tmp_path):
    box = Outbox(tmp_path, BIG, clock=lambda: 1_900_000_000.25)
    assert box.epoch == 1_900_000_000_250
    assert json.loads((tmp_path / "outbox.json").read_text())["epoch"] == box.epoch  # written at creation
    assert box.add("dev-1", [], T0).epoch == box.epoch
    again = Outbox(tmp_path, BIG, clock=lambda: 2_000_000_000.0)  # a later start keeps it
    assert again.epoch == 1_900_000_000_250 and again.add("dev-1", [], T0).epoch == again.epoch


def test_a_lost_state_file_starts_a_new_epoch_and_old_batches_keep_theirs(tmp_path):
    box = Outbox(tmp_path, BIG, clock=lambda: 1_900_000_000.0)
    w = record([(5.0, True, 1.0, 1)], 0)
    old = [box.add("dev-1", [w], T0), box.add("dev-1", [w], T0)]
    (tmp_path / "outbox.json").unlink()
    # The device clock went back (no RTC): the new epoch still differs from, and is above, the one on disk.
    renewed = Outbox(tmp_path, BIG, clock=lambda: 1_000.0)
    assert renewed.epoch == old[0].epoch + 1
    assert renewed.pending() == old  # resent as they are, with their own epoch
    new = renewed.add("dev-1", [w], T0)
    assert (new.epoch, new.seq) == (renewed.epoch, 2)  # seq goes on past the files: names never collide
    assert [(b.epoch, b.seq) for b in renewed.pending()] == [(old[0].epoch, 0), (old[0].epoch, 1), (new.epoch, 2)]
    (tmp_path / "outbox.json").write_text("{not json")  # unreadable counts as lost
    assert Outbox(tmp_path, BIG, clock=lambda: 1_000.0).epoch == new.epoch + 1


# -- acks ------------------------------------------------------------------------------------------------------


def test_acks_name_the_epoch(tmp_path):
    box = Outbox(tmp_path, BIG)
    for _ in range(4):
        box.add("dev-1", [], T0)
    assert box.ack(0, epoch=box.epoch + 1) is False and len(box) == 4  # another incarnation's ack: ignored
    assert box.ack(0, epoch=box.epoch) is True and box.ack(0, epoch=box.epoch) is False
    assert box.ack_many(box.epoch + 1, [1, 2]) == 0
    assert box.ack_many(box.epoch, [1, 2, 99]) == 2
    assert box.ack(3) is True  # no epoch given: today's callers
    assert len(Outbox(tmp_path, BIG)) == 0


def test_outbox_survives_restart_and_drains_on_ack(tmp_path):
    """Copied from tests/edge_agent/test_telemetry.py (Outbox-specific; delete it there)."""
    tel = Telemetry("dev-1", 60, Outbox(tmp_path / "outbox", 1 << 20))
    for n in range(3):
        tel.record("m", 1, 1.0, T0 + timedelta(seconds=60 * n))
    batches = tel.flush(T0 + timedelta(seconds=60 * 3))
    assert [b.seq for b in batches] == [0]  # one flush, one batch of three windows
    tel.record("m", 1, 1.0, T0 + timedelta(seconds=200))
    tel.flush(T0 + timedelta(seconds=300))
    outbox = Outbox(tmp_path / "outbox", 1 << 20)  # restart
    pending = outbox.pending()
    assert [b.seq for b in pending] == [0, 1] and len(pending[0].windows) == 3
    assert parse_message(pending[0].to_wire(), TelemetryBatch) == pending[0]
    assert outbox.ack(0) and not outbox.ack(0)
    assert [b.seq for b in Outbox(tmp_path / "outbox", 1 << 20).pending()] == [1]
    outbox.ack(1)
    # seq keeps rising after everything was acknowledged and the process restarted
    again = Outbox(tmp_path / "outbox", 1 << 20)
    assert again.add("dev-1", [], T0).seq == 2


# -- attempted -------------------------------------------------------------------------------------------------


def test_an_attempted_mark_survives_a_reopen_and_is_never_merged(tmp_path):
    rng = random.Random(1)
    box = Outbox(tmp_path, BIG)
    made = [box.add("dev-1", [record(requests(rng, 20), 60 * n)], T0) for n in range(6)]
    assert box.mark_attempted(2) == made[2] and box.mark_attempted(2, epoch=box.epoch + 1) is None
    assert box.mark_attempted(77) is None
    attempted = next(tmp_path.glob("*-a.json")).stat().st_size
    box = Outbox(tmp_path, attempted + 1000)  # reopened, and now over its bound
    pending = box.pending()
    assert made[2] in pending  # untouched: the cloud may hold it
    # Everything else went into one batch under the newest seq it replaced, its windows coarser.
    assert [b.seq for b in pending] == [2, 5] and pending[1].merged_windows == 5 and len(pending[1].windows) == 1
    assert tally(pending) == tally(made) and box.dropped_total == 0 and box.merged_total == 5


def test_a_batch_merged_away_after_pending_is_not_to_be_sent(tmp_path):
    rng = random.Random(2)
    box = Outbox(tmp_path, BIG)
    for n in range(4):
        box.add("dev-1", [record(requests(rng, 5), 60 * n)], T0)
    stale = box.pending()  # the link's copy
    box.max_bytes = 1
    newest = box.add("dev-1", [record(requests(rng, 5), 240)], T0)  # merges all five
    assert [box.mark_attempted(b.seq, b.epoch) for b in stale] == [None] * 4
    sent = box.mark_attempted(newest.seq, box.epoch)  # the merged batch took seq 4: this is what goes out
    assert sent is not None and sent != newest and sent.merged_windows == 5
    assert Tally.of(sent.windows) == tally(stale + [newest])


# -- merging windows -------------------------------------------------------------------------------------------


def test_merged_means_equal_one_window_over_all_the_requests(tmp_path):
    rng = random.Random(3)
    per_minute = [requests(rng, rng.randint(1, 40)) for _ in range(10)]
    per_minute[4] = [(9.0, False, None, 5)] * 3  # a minute of failures only: no figures, still counted
    parts = [record(r, 60 * n) for n, r in enumerate(per_minute)]
    [merged] = merge_windows(parts)
    truth = record([q for r in per_minute for q in r], 0, 600)
    assert (merged.start, merged.end) == (truth.start, truth.end)
    assert (merged.count, merged.errors, merged.rows) == (truth.count, truth.errors, truth.rows)
    for name in ("mean_ms", "row_ms", "mean_mj", "row_mj"):
        assert getattr(merged, name) == pytest.approx(getattr(truth, name), rel=1e-12), name
    # Percentiles cannot be merged exactly: p50 and p95 by successful requests, p99 the worst window's.
    ok = [(w, w.count - w.errors) for w in parts if w.count > w.errors]
    assert merged.p50_ms == pytest.approx(sum(w.p50_ms * n for w, n in ok) / sum(n for _, n in ok), rel=1e-12)
    assert merged.p95_ms == pytest.approx(sum(w.p95_ms * n for w, n in ok) / sum(n for _, n in ok), rel=1e-12)
    assert merged.p99_ms == max(w.p99_ms for w, _ in ok)
    assert parse_message(TelemetryWindow.model_validate(merged.model_dump()).model_dump_json().encode(),
                         TelemetryWindow) == merged
    # Merging again, coarser, keeps the same sums.
    [twice] = merge_windows([merge_windows(parts[:3])[0], merge_windows(parts[3:])[0]])
    for name in ("mean_ms", "row_ms", "mean_mj", "row_mj", "p50_ms", "p95_ms", "p99_ms"):
        assert getattr(twice, name) == pytest.approx(getattr(merged, name), rel=1e-12), name


def test_merged_windows_sum_the_policys_reasons():
    parts = [record([(1.0, True, 1.0, 1)] * 10, 60 * n).model_copy(update={"reasons": r}) for n, r in enumerate(
        ({"local_within_budget": 7, "low_confidence": 3}, {"local_within_budget": 2}, {}))]
    [merged] = merge_windows(parts)
    assert merged.reasons == {"local_within_budget": 9, "low_confidence": 3}
    assert TelemetryWindow.model_validate(merged.model_dump()) == merged  # still within the contract


def test_merged_windows_roll_up_in_the_cloud_as_the_originals_do(tmp_path):
    """The real cloud roll-up (cloud/store_telemetry.py, SQLite) over the originals and over the merged windows.
    Without failed requests the cloud's weights (requests, rows) are the definitional ones (successful requests,
    their rows), so the two roll-ups must agree."""
    rng = random.Random(4)
    parts = [record(requests(rng, rng.randint(1, 30), error_rate=0.0), 60 * n, model=m)
             for n in range(12) for m in ("a", "b")]
    merged = merge_windows(parts)
    assert len(merged) == 2
    store = Store.open(f"sqlite:///{tmp_path / 'cloud.db'}")
    try:
        store.add_telemetry("orig", 0, [w.model_dump() for w in parts], 0, T0)
        store.add_telemetry("merged", 0, [w.model_dump() for w in merged], 0, T0, merged_windows=len(parts))
        summary = store.telemetry_summary(T0)
    finally:
        store.close()
    for want, got in zip(summary["orig"], summary["merged"]):
        assert (got.model, got.count, got.errors, got.rows) == (want.model, want.count, want.errors, want.rows)
        for name in ("mean_ms", "row_ms", "mean_mj", "row_mj", "p50_ms", "p95_ms", "p99_ms"):
            assert getattr(got, name) == pytest.approx(getattr(want, name), rel=1e-9), name


def test_labels_of_a_mix_and_what_is_never_merged():
    rng = random.Random(5)
    a = record(requests(rng, 10), 0, source="measured", meter="rapl")
    b = record(requests(rng, 10), 60, source="estimated", meter="modelled")
    [ab] = merge_windows([a, b])
    assert ab.energy_source == "estimated" and ab.energy_meter == ""  # the weaker label; a mix names no meter
    c = record(requests(rng, 10), 120, source="measured", meter="rapl")
    [ac] = merge_windows([a, c])
    assert (ac.energy_source, ac.energy_meter) == ("measured", "rapl")
    net = a.model_copy(update={"row_net_mj": a.row_mj / 2, "idle_w": 2.0})
    net2 = c.model_copy(update={"row_net_mj": c.row_mj / 4, "idle_w": 2.0})
    [nn] = merge_windows([net, net2])
    ok_rows = [w.count - w.errors for w in (a, c)]  # weights of the per-row energy: rows of the metered requests
    e_rows = [n * w.mean_mj / w.row_mj for n, w in zip(ok_rows, (a, c))]
    want = (a.row_mj / 2 * e_rows[0] + c.row_mj / 4 * e_rows[1]) / sum(e_rows)
    assert nn.row_net_mj == pytest.approx(want, rel=1e-9) and nn.idle_w == 2.0 and nn.row_net_mj <= nn.row_mj
    unmetered = record(requests(rng, 10, metered=False), 180)
    assert len(merge_windows([a, unmetered])) == 2  # with and without energy: how many were metered is unknown
    assert len(merge_windows([a, record(requests(rng, 3), 0, model="other")])) == 2
    day = [record(requests(rng, 3), 0, MAX_WINDOW_S), record(requests(rng, 3), MAX_WINDOW_S, 60)]
    assert merge_windows(day) == sorted(day, key=lambda w: w.start)  # a day is the coarsest window


# -- the full outbox -------------------------------------------------------------------------------------------


def test_full_outbox_merges_before_it_drops_and_counts_what_it_drops(tmp_path):
    """Replaces test_full_outbox_drops_oldest_and_counts in tests/edge_agent/test_telemetry.py (delete it there)."""
    tel = Telemetry("dev-1", 60, Outbox(tmp_path / "outbox", 1500))
    made = []
    for n in range(8):
        tel.record("m", 1, 1.0 + n, T0 + timedelta(seconds=60 * n))
        tel.record("m", 2, 2.0, T0 + timedelta(seconds=60 * n), ok=False)
        made += tel.flush(T0 + timedelta(seconds=60 * (n + 1)))
    box = tel.outbox
    pending = box.pending()
    assert box.size_bytes() <= 1500 and box.dropped_total == 0 and box.merged_total > 0
    assert tally(pending) == tally(made) == Tally(16, 8, 16)  # nothing lost: coarser, not fewer
    assert sum(originals(b) for b in pending) == 16
    [m1] = [w for b in pending for w in b.windows if w.model == "m" and w.version == 1 and w.start == T0]
    assert m1.mean_ms == pytest.approx(sum(1.0 + k for k in range(m1.count)) / m1.count)
    # Now everything the link handed over is attempted: merging cannot help, so the oldest goes, counted.
    for b in pending:
        box.mark_attempted(b.seq)
    box.max_bytes = 1
    tel.record("m", 1, 1.0, T0 + timedelta(seconds=600))
    [last] = tel.flush(T0 + timedelta(seconds=660))
    assert [b.seq for b in box.pending()] == [last.seq]  # the newest is always kept
    dropped = sum(originals(b) for b in pending)
    assert box.dropped_total == box.dropped_attempted_total == box.dropped_pending == dropped
    assert box.dropped_detail == tally(pending)
    assert box.add("dev-1", [], T0).dropped_windows == dropped  # reported in the next batch
    reopened = Outbox(tmp_path / "outbox", 1)
    assert (reopened.dropped_total, reopened.merged_total, reopened.dropped_pending) == (dropped, box.merged_total, 0)


def test_never_attempted_batches_are_dropped_before_attempted_ones(tmp_path):
    box = Outbox(tmp_path, BIG)
    for n in range(4):  # windows of a full day: maximal, nothing to coarsen
        box.add("dev-1", [record([(1.0, True, 1.0, 1)], MAX_WINDOW_S * n, MAX_WINDOW_S)], T0)
    box.mark_attempted(1)
    box.mark_attempted(3)
    kept = sum(p.stat().st_size for p in tmp_path.glob("*-a.json"))
    box = Outbox(tmp_path, kept)  # room for the two attempted batches only
    # 0 and 2 were merged first (a day each, kept apart: one batch instead of two), and that batch was dropped
    # rather than the older attempted 1.
    assert [b.seq for b in box.pending()] == [1, 3]
    assert (box.merged_total, box.dropped_total, box.dropped_attempted_total, box.dropped_pending) == (2, 2, 0, 2)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), n_batches=st.integers(1, 14), bound=st.integers(1, 12_000),
       attempt=st.lists(st.booleans(), min_size=14, max_size=14))
def test_property_nothing_is_lost_or_counted_twice(tmp_path_factory, seed, n_batches, bound, attempt):
    rng = random.Random(seed)
    path = tmp_path_factory.mktemp("outbox")
    box = Outbox(path, bound)
    added: list[TelemetryBatch] = []
    marked: dict[int, TelemetryBatch] = {}
    minute = 0
    for n in range(n_batches):
        windows = []
        for model in rng.sample(("a", "b", "c"), rng.randint(0, 3)):
            w = record(requests(rng, rng.randint(1, 12), metered=model != "c", error_rate=rng.choice((0, 0.3, 1))),
                       60 * (minute + rng.randint(0, 2)), model=model)
            if w.row_mj is not None and model == "b":
                w = w.model_copy(update={"row_net_mj": w.row_mj * rng.random(), "idle_w": 1.5})
            windows.append(w)
        minute += rng.choice((1, 3, 200, 1500))
        added.append(box.add("dev-1", windows, T0))
        for b in box.pending():
            if attempt[n] and rng.random() < 0.3 and b.seq not in marked:
                sent = box.mark_attempted(b.seq, b.epoch)
                assert sent is not None
                marked[b.seq] = sent
    for reopen in (False, True):
        if reopen:
            box = Outbox(path, bound)
        pending = box.pending()
        for b in pending:
            assert parse_message(b.to_wire(), TelemetryBatch) == b  # every batch, merged or not, in the contract
        assert box.size_bytes() <= bound or len(pending) == 1
        # Every original window, request, error and row is pending or counted as dropped; never both, never twice.
        assert sum(originals(b) for b in pending) + box.dropped_total == sum(len(b.windows) for b in added)
        assert tally(pending) + box.dropped_detail == tally(added)
        assert sum(b.dropped_windows for b in pending) + box.dropped_pending == box.dropped_total
        assert sum(b.merged_windows for b in pending) <= box.merged_total <= sum(len(b.windows) for b in added)
        assert box.dropped_attempted_total <= box.dropped_total
        for b in pending:  # an attempted batch is exactly what was handed over
            if b.seq in marked:
                assert b == marked[b.seq]
        if box.dropped_total == 0:  # then every mean's sums are kept exactly, per model
            for model in "abc":
                got = ok_sums([w for b in pending for w in b.windows if w.model == model])
                want = ok_sums([w for b in added for w in b.windows if w.model == model])
                assert got[0] == want[0] and got[1:] == pytest.approx(want[1:], rel=1e-9)


# -- crashes ---------------------------------------------------------------------------------------------------


def full_outbox(path, rng) -> tuple[Outbox, list[TelemetryBatch]]:
    box = Outbox(path, BIG)
    made = [box.add("dev-1", [record(requests(rng, 8), 60 * n, model=m) for m in ("a", "b")], T0) for n in range(5)]
    box.max_bytes = 1
    return box, made


def crash_on(monkeypatch, name: str, when) -> None:
    real = getattr(outbox_mod, name)

    def fake(*args, **kwargs):
        if when(*args):
            raise Crash(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(outbox_mod, name, fake)


def test_a_crash_after_the_merged_batch_was_written_does_not_count_twice(tmp_path, monkeypatch):
    rng = random.Random(6)
    box, made = full_outbox(tmp_path, rng)
    crash_on(monkeypatch, "_remove", lambda path: True)  # before the first original is deleted
    with pytest.raises(Crash):
        box.add("dev-1", [], T0)
    monkeypatch.undo()
    names = sorted(p.name for p in tmp_path.glob("0*.json"))
    assert any("-m1" in n for n in names) and len(names) == 7  # the merged batch beside all six originals
    again = Outbox(tmp_path, BIG)
    pending = again.pending()
    assert len(pending) == 1 and pending[0].merged_windows == 10
    assert tally(pending) == tally(made) and again.merged_total == 10 and again.dropped_total == 0
    assert [p.name for p in tmp_path.glob("0*.json")] == [n for n in names if "-m1" in n]  # leftovers deleted


def test_a_crash_between_deletions_of_the_originals(tmp_path, monkeypatch):
    rng = random.Random(7)
    box, made = full_outbox(tmp_path, rng)
    calls = []
    crash_on(monkeypatch, "_remove", lambda path: calls.append(path) or len(calls) == 3)
    with pytest.raises(Crash):
        box.add("dev-1", [], T0)
    monkeypatch.undo()
    again = Outbox(tmp_path, BIG)
    assert tally(again.pending()) == tally(made) and again.merged_total == 10 and len(again) == 1


def test_a_crash_before_the_merged_batch_was_written_rolls_the_merge_back(tmp_path, monkeypatch):
    rng = random.Random(8)
    box, made = full_outbox(tmp_path, rng)
    crash_on(monkeypatch, "atomic_write_bytes", lambda path, data, *a: "-m" in str(path))
    with pytest.raises(Crash):
        box.add("dev-1", [], T0)
    monkeypatch.undo()
    assert json.loads((tmp_path / "outbox.json").read_text())["intent"]["op"] == "merge"
    again = Outbox(tmp_path, BIG)
    pending = again.pending()
    assert [b.seq for b in pending] == [0, 1, 2, 3, 4, 5] and pending[:5] == made
    assert again.merged_total == 0 and again.dropped_total == 0  # nothing merged after all: not counted
    merged = Outbox(tmp_path, 1)  # the merge happens on the next start instead, counted once
    assert merged.merged_total == 10 and tally(merged.pending()) == tally(made)


def test_a_crash_in_a_drop_counts_it_once(tmp_path, monkeypatch):
    box = Outbox(tmp_path, BIG)
    w = record([(1.0, True, 1.0, 1)], 0)
    for _ in range(3):
        box.add("dev-1", [w], T0)
    for seq in range(3):
        box.mark_attempted(seq)
    box.max_bytes = 1
    crash_on(monkeypatch, "_remove", lambda path: True)  # counted and recorded, the file not yet gone
    with pytest.raises(Crash):
        box.add("dev-1", [], T0)
    monkeypatch.undo()
    again = Outbox(tmp_path, 1)
    assert again.dropped_total == 3 and again.dropped_pending == 3 and [b.seq for b in again.pending()] == [3]


def test_a_crash_after_a_batch_write_does_not_report_drops_twice(tmp_path, monkeypatch):
    box = Outbox(tmp_path, BIG)
    w = record([(1.0, True, 1.0, 1)], 0)
    for _ in range(2):
        box.add("dev-1", [w], T0)
    box.mark_attempted(0)
    box.mark_attempted(1)
    box.max_bytes = 1
    box.add("dev-1", [], T0)  # drops 0 and 1: two windows wait for the next batch
    assert box.dropped_pending == 2
    crash_on(monkeypatch, "atomic_write_json", lambda path, obj, *a: obj.get("next_seq") == 4)
    with pytest.raises(Crash):
        box.add("dev-1", [], T0)  # seq 3 written, carrying the 2; the state save after it never happened
    monkeypatch.undo()
    again = Outbox(tmp_path, BIG)
    assert again.dropped_pending == 0 and [b.dropped_windows for b in again.pending()] == [0, 2]
    assert again.add("dev-1", [], T0).seq == 4
