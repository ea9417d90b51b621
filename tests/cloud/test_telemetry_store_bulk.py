"""cloud/store_telemetry.py's bulk ingest: many batches in one transaction (a multi-row claim, then the windows by
binary COPY on PostgreSQL or one executemany on SQLite), each stored exactly once, the counters exact; on SQLite and
PostgreSQL alike (the `db_url` fixture)."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from edgefleet.cloud.errors import Conflict
from edgefleet.cloud.store import Store
from edgefleet.cloud.store_telemetry import REPLAYED, STORED, UNKNOWN_DEVICE, BatchIn

NOW = datetime(2025, 5, 1, 10, 0, 0, tzinfo=timezone.utc)
COUNTERS = ("telemetry_batches", "telemetry_windows", "telemetry_replayed", "telemetry_dropped_windows",
            "telemetry_merged_windows", "dropped_unknown_device")


@pytest.fixture
def store(db_url):
    s = Store.open(db_url)
    try:
        for device_id in ("d1", "d2", "d3"):
            s.enroll_device(device_id, "rpi4", {}, "0.1", device_id.ljust(64, "0"), NOW)
        yield s
    finally:
        s.close()


def window(i: int = 0, **over) -> dict:
    """A full window as `TelemetryWindow.model_dump()` gives it, every column set, distinct per `i`."""
    start = NOW + timedelta(seconds=60 * i)
    return {"model": "m", "version": 1 + i % 3, "start": start, "end": start + timedelta(seconds=60),
            "count": 10 + i, "errors": i % 2, "rows": 40 + i, "p50_ms": 1.0 + i, "p95_ms": 2.0 + i, "p99_ms": 3.0 + i,
            "mean_ms": 1.5 + i, "row_ms": 0.5 + i / 100, "mean_mj": 4.0 + i, "row_mj": 1.0 + i / 100,
            "energy_source": "measured", "energy_meter": "rapl", "energy_method": "counter", "energy_hz": None,
            "row_net_mj": 0.5 + i / 100, "idle_w": 2.25, "where": "local", **over}


def counters(store: Store) -> dict[str, int]:
    got = store.counters()
    return {name: got.get(name, 0) for name in COUNTERS}


def stored_windows(store: Store) -> list[tuple]:
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(
            'SELECT device_id, epoch, seq, model, version, count, errors, rows, p50_ms, p95_ms, p99_ms, mean_ms, '
            'row_ms, mean_mj, row_mj, energy_source, energy_meter, energy_method, energy_hz, row_net_mj, idle_w, '
            '"where" FROM telemetry_windows ORDER BY device_id, epoch, seq, count'))]


def test_one_call_mixes_stored_replayed_and_unknown_with_exact_counters(store):
    assert store.add_telemetry_many([BatchIn("d1", 7, 1, [window(0)])], NOW) == [STORED]
    batches = [
        BatchIn("d1", 7, 1, [window(0)]),  # stored by the call before
        BatchIn("d1", 7, 2, [window(1), window(2)], dropped_windows=3, merged_windows=4),
        BatchIn("ghost", 0, 1, [window(3)]),  # no such device
        BatchIn("d1", 7, 2, [window(1), window(2)], dropped_windows=3, merged_windows=4),  # twice in this call
        BatchIn("d1", 8, 2, [window(4)]),  # the same seq in a new epoch is a new batch
        BatchIn("d2", 7, 2, []),  # a batch of no windows is still claimed
    ]
    assert store.add_telemetry_many(batches, NOW) == [REPLAYED, STORED, UNKNOWN_DEVICE, REPLAYED, STORED, STORED]
    assert counters(store) == {"telemetry_batches": 4, "telemetry_windows": 4, "telemetry_replayed": 2,
                               "telemetry_dropped_windows": 3, "telemetry_merged_windows": 4,
                               "dropped_unknown_device": 1}
    assert [(r[0], r[1], r[2], r[5]) for r in stored_windows(store)] == [
        ("d1", 7, 1, 10), ("d1", 7, 2, 11), ("d1", 7, 2, 12), ("d1", 8, 2, 14)]
    with store.engine.connect() as conn:
        batch_rows = conn.execute(sa.text("SELECT device_id, epoch, seq, windows, dropped_windows, merged_windows "
                                          "FROM telemetry_batches ORDER BY device_id, epoch, seq")).all()
    assert [tuple(r) for r in batch_rows] == [("d1", 7, 1, 1, 0, 0), ("d1", 7, 2, 2, 3, 4), ("d1", 8, 2, 1, 0, 0),
                                              ("d2", 7, 2, 0, 0, 0)]


def test_known_only_off_stores_for_any_device(store):
    assert store.add_telemetry_many([BatchIn("ghost", 0, 1, [window()])], NOW, known_only=False) == [STORED]
    assert counters(store)["dropped_unknown_device"] == 0 and len(stored_windows(store)) == 1


def test_every_column_round_trips_as_the_orm_wrote_it(store):
    # Each column once through the bulk path, compared field by field with what went in (COPY types are exact).
    full = window(5, energy_hz=123.5, where="cloud", energy_source="estimated")
    sparse = {k: v for k, v in window(6).items()
              if k not in ("energy_meter", "energy_method", "energy_hz", "row_net_mj", "idle_w", "where")}
    store.add_telemetry_many([BatchIn("d1", 2**62, 2**63 - 1, [full, sparse])], NOW)
    got = stored_windows(store)
    columns = ("model", "version", "count", "errors", "rows", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "row_ms",
               "mean_mj", "row_mj", "energy_source", "energy_meter", "energy_method", "energy_hz", "row_net_mj",
               "idle_w", "where")
    assert got[0] == ("d1", 2**62, 2**63 - 1, *(full[c] for c in columns))
    defaults = {"energy_meter": "", "energy_method": "", "energy_hz": None, "row_net_mj": None, "idle_w": None,
                "where": "local"}
    assert got[1] == ("d1", 2**62, 2**63 - 1, *({**sparse, **defaults}[c] for c in columns))
    ends = {agg.version: agg.end for agg in store.telemetry_summary(NOW)["d1"]}
    assert ends == {full["version"]: full["end"], sparse["version"]: sparse["end"]}


def test_times_in_another_zone_are_stored_as_the_same_instant(store):
    east = timezone(timedelta(hours=5))
    w = window(0, start=NOW.astimezone(east), end=(NOW + timedelta(seconds=60)).astimezone(east))
    store.add_telemetry_many([BatchIn("d1", 0, 1, [w])], NOW)
    (agg,) = store.telemetry_summary(NOW)["d1"]
    assert agg.end == NOW + timedelta(seconds=60)
    assert store.telemetry_summary(NOW + timedelta(seconds=61)) == {}


def test_exactly_once_under_replays_within_and_across_calls(store):
    # 600 batches of 1 to 5 windows from three devices, sent in calls of random size with 30% of them resent at
    # random places (within the same call and in later ones): each stored once, every resend counted.
    rng = random.Random(9)
    unique = [BatchIn(f"d{1 + n % 3}", n % 2, n, [window(n % 50 + k) for k in range(1 + n % 5)])
              for n in range(600)]
    sends = unique + [rng.choice(unique) for _ in range(180)]
    rng.shuffle(sends)
    outcomes: list[str] = []
    while sends:
        size = rng.randint(1, 150)
        call, sends = sends[:size], sends[size:]
        outcomes += store.add_telemetry_many(call, NOW)
    windows = sum(len(b.windows) for b in unique)
    assert outcomes.count(STORED) == 600 and outcomes.count(REPLAYED) == 180
    assert counters(store) == {"telemetry_batches": 600, "telemetry_windows": windows, "telemetry_replayed": 180,
                               "telemetry_dropped_windows": 0, "telemetry_merged_windows": 0,
                               "dropped_unknown_device": 0}
    got = stored_windows(store)
    assert len(got) == windows
    assert sorted({(r[0], r[1], r[2]) for r in got}) == sorted((b.device_id, b.epoch, b.seq) for b in unique)


def test_a_failing_window_stores_nothing_of_the_call(store):
    # A NULL in a NOT NULL column fails the COPY (or the executemany): the claims and counters of the whole call
    # roll back with it, so a retry stores everything once.
    bad = [BatchIn("d1", 0, 1, [window(0)]), BatchIn("d2", 0, 1, [window(1, count=None)])]
    with pytest.raises(Conflict):
        store.add_telemetry_many(bad, NOW)
    assert counters(store) == dict.fromkeys(COUNTERS, 0) and stored_windows(store) == []
    assert store.add_telemetry_many([bad[0]], NOW) == [STORED]
    assert counters(store)["telemetry_batches"] == 1


@pytest.mark.parametrize("bad", [{"start": NOW.replace(tzinfo=None)}, {"colour": "red"}], ids=["naive", "unknown"])
def test_a_window_the_table_cannot_hold_is_an_error_naming_it(store, bad):
    with pytest.raises(ValueError, match="naive datetime|no column for"):
        store.add_telemetry_many([BatchIn("d1", 0, 1, [window(0, **bad)])], NOW)
    assert stored_windows(store) == [] and counters(store)["telemetry_batches"] == 0


def reason_rows(store: Store) -> list[tuple]:
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(
            'SELECT device_id, model, version, "where", reason, count FROM telemetry_reasons '
            'ORDER BY device_id, "where", reason'))]


def test_offload_reasons_are_stored_once_and_left_in_the_batch_for_a_retry(store):
    from edgefleet.cloud.store_efficiency import offload_mix

    local = window(0, rows=30, count=10, reasons={"local_within_budget": 6, "low_confidence": 0})
    cloud = window(1, version=1, rows=20, count=11, where="cloud", reasons={"local_p95_over_budget": 5,
                                                                             "low_confidence": 3})
    batch = BatchIn("d1", 1, 1, [local, cloud])
    assert store.add_telemetry_many([batch], NOW) == [STORED]
    assert store.add_telemetry_many([batch], NOW) == [REPLAYED]  # a replay adds no decisions
    assert local["reasons"] == {"local_within_budget": 6, "low_confidence": 0}  # the caller's batch is untouched
    assert reason_rows(store) == [("d1", "m", 1, "cloud", "local_p95_over_budget", 5),
                                  ("d1", "m", 1, "cloud", "low_confidence", 3),
                                  ("d1", "m", 1, "local", "local_within_budget", 6)]  # a zero count is not a row
    mix = offload_mix(store, NOW - timedelta(hours=1))
    got = mix[("d1", "m")]
    assert (got.local_rows, got.cloud_rows) == (30, 20) and got.share == pytest.approx(0.4)
    assert got.reasons == {"local_within_budget": 6, "local_p95_over_budget": 5, "low_confidence": 3}
    assert offload_mix(store, NOW + timedelta(hours=1)) == {}  # the look-back
    assert offload_mix(store, NOW - timedelta(hours=1), device_id="d2") == {}
    # Retention takes the decisions with the raw windows.
    store.telemetry_rollup()
    far = NOW + timedelta(days=30)
    assert store.telemetry_retention(far, NOW - timedelta(days=400), NOW - timedelta(days=400))["reasons_deleted"] == 3
    assert reason_rows(store) == []


def test_the_fast_decoders_rows_store_what_the_window_dicts_store(store):
    """The same windows, once as dicts (pydantic's path) on d1 and once as the fast decoder's rows on d2: the
    database ends up holding the same windows, reasons and counters for each."""
    import json

    from edgefleet.cloud.telemetry_decode import decode_batch

    ws = [window(0, reasons={"local_within_budget": 6}), window(1, where="cloud", reasons={"low_confidence": 3}),
          window(2)]
    wire = [{**w, "start": w["start"].isoformat(), "end": w["end"].isoformat()} for w in ws]
    raw = json.dumps({"schema_version": 1, "kind": "telemetry", "device_id": "d2", "epoch": 1, "seq": 1,
                      "sent_at": NOW.isoformat(), "windows": wire, "dropped_windows": 2, "merged_windows": 1})
    fast = decode_batch(raw.encode())
    assert fast is not None and fast.rows is not None and fast.size == 3
    assert store.add_telemetry_many([BatchIn("d1", 1, 1, ws, 2, 1), fast], NOW) == [STORED, STORED]
    assert store.add_telemetry_many([fast], NOW) == [REPLAYED]
    d1 = [r[1:] for r in stored_windows(store) if r[0] == "d1"]
    d2 = [r[1:] for r in stored_windows(store) if r[0] == "d2"]
    assert d1 == d2 and len(d1) == 3
    with store.engine.connect() as conn:  # the batch claims, which the roll-ups and sent == stored checks read
        claims = sorted(tuple(r) for r in conn.execute(sa.text(
            "SELECT device_id, windows, dropped_windows, merged_windows FROM telemetry_batches")))
    assert claims == [("d1", 3, 2, 1), ("d2", 3, 2, 1)]
    reasons = reason_rows(store)
    assert [r[1:] for r in reasons if r[0] == "d1"] == [r[1:] for r in reasons if r[0] == "d2"] != []
    assert counters(store) == {**dict.fromkeys(COUNTERS, 0), "telemetry_batches": 2, "telemetry_windows": 6,
                               "telemetry_replayed": 1, "telemetry_dropped_windows": 4, "telemetry_merged_windows": 2}


def test_a_subnormal_figure_does_not_break_the_summary(store):
    """5e-324 ms is a valid latency on the wire (>= 0); its mean over 3 requests rounds to zero, which PostgreSQL
    refuses as an underflow unless the summary guards it (store_telemetry._mean). The summary answers, with 0."""
    tiny = window(0, count=4, errors=1, rows=4, p50_ms=5e-324, p95_ms=5e-324, p99_ms=5e-324, mean_ms=5e-324,
                  row_ms=5e-324, mean_mj=5e-324, row_mj=5e-324, row_net_mj=5e-324)
    assert store.add_telemetry_many([BatchIn("d1", 0, 1, [tiny])], NOW) == [STORED]
    [agg] = store.telemetry_summary(NOW - timedelta(hours=1))["d1"]
    assert agg.count == 4 and agg.p50_ms == 0.0 and agg.mean_mj == 0.0
    store.telemetry_rollup()  # and through the hourly roll-up
    [agg] = store.telemetry_summary(NOW - timedelta(hours=3))["d1"]
    assert agg.count == 4 and agg.p50_ms in (0.0, 5e-324)
