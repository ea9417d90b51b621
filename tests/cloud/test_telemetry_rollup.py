"""cloud/telemetry_rollup.py and the roll-up, retention and partition parts of cloud/store_telemetry.py, on SQLite
and PostgreSQL (`db_url`), migrated by Alembic: hourly sums give the summaries the raw windows give, retention drops
only what is rolled up, PostgreSQL's day partitions are made ahead and dropped whole, and migration 0008 converts a
0007 database with its windows."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from edgefleet.cloud.settings import Settings
from edgefleet.cloud.store import Store
from edgefleet.cloud.store_telemetry import BatchIn
from edgefleet.cloud.store_telemetry_upkeep import PARTITION_SCHEMA
from edgefleet.cloud.telemetry_rollup import maintain_telemetry, plan

NOW = datetime.now(timezone.utc).replace(minute=20, second=0, microsecond=0)
TODAY = NOW.replace(hour=0, minute=0)


def window(end: datetime, rng: random.Random, **over) -> dict:
    count = rng.randint(1, 50)
    errors = rng.randint(0, count - 1)
    p50 = rng.uniform(0.1, 20)
    w = {"model": rng.choice(["a", "b"]), "version": rng.randint(1, 2), "start": end - timedelta(seconds=30),
         "end": end, "count": count, "errors": errors, "rows": count * rng.randint(1, 8), "p50_ms": p50,
         "p95_ms": p50 * 2, "p99_ms": p50 * 3, "mean_ms": p50 * 1.1, "row_ms": p50 / 2, "mean_mj": rng.uniform(0, 9),
         "row_mj": None, "energy_source": rng.choice(["measured", "estimated"]), "energy_meter": "m", "where": "local"}
    w["row_mj"] = w["mean_mj"] / 2
    if rng.random() < 0.2:  # some windows without latency or energy figures
        w.update(p50_ms=None, p95_ms=None, p99_ms=None, mean_ms=None, row_ms=None)
    if rng.random() < 0.2:
        w.update(mean_mj=None, row_mj=None)
    return {**w, **over}


def fill(store: Store, rng: random.Random, first_seq: int, n: int, since: datetime, span_s: int) -> None:
    batches = []
    for i in range(n):
        ends = [since + timedelta(seconds=rng.randint(0, span_s)) for _ in range(rng.randint(1, 4))]
        batches.append(BatchIn(rng.choice(["d1", "d2", "d3"]), 0, first_seq + i, [window(e, rng) for e in ends]))
    store.add_telemetry_many(batches, NOW, known_only=False)


def raw_summary(store: Store, since: datetime, device_id: str | None = None) -> dict:
    # min_rows=1 reads the raw windows only, and every window here has rows >= 1: the reference.
    return store.telemetry_summary(since, device_id, min_rows=1)


def assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for device in want:
        assert len(got[device]) == len(want[device])
        for a, b in zip(got[device], want[device], strict=True):
            assert (a.model, a.version, a.count, a.errors, a.rows, a.windows, a.p99_ms, a.energy_source, a.end) == (
                b.model, b.version, b.count, b.errors, b.rows, b.windows, b.p99_ms, b.energy_source, b.end)
            for f in ("p50_ms", "p95_ms", "mean_ms", "mean_mj", "row_ms", "row_mj"):
                want_f = getattr(b, f)
                assert getattr(a, f) == (None if want_f is None else pytest.approx(want_f, rel=1e-9)), (device, f)


def roll_up(store: Store) -> int:
    # The roll-up reaches as far as the call before saw: two calls take everything stored before the first.
    return store.telemetry_rollup() + store.telemetry_rollup()


def hourly_rows(store: Store) -> int:
    with store.engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM telemetry_hourly")).scalar_one()


def test_summaries_read_from_hours_equal_the_raw_windows(store):
    rng = random.Random(1)
    fill(store, rng, 0, 300, NOW - timedelta(hours=6), 6 * 3600)
    # One window outside the contract: left out of the hours as it is out of the summary.
    store.add_telemetry("d1", 10_000, [window(NOW - timedelta(hours=3), rng, p95_ms=1e308)], 0, NOW)
    assert store.telemetry_rollup() == 0  # the first call only looks: nothing it saw may still be uncommitted
    assert store.telemetry_rollup() > 0 and hourly_rows(store) > 0
    # Then late windows for hours already summed, and new ones, not rolled up yet.
    fill(store, rng, 1000, 40, NOW - timedelta(hours=5), 5 * 3600)
    for since in (NOW - timedelta(hours=7), NOW - timedelta(hours=4, minutes=13), TODAY - timedelta(days=1),
                  (NOW - timedelta(hours=2)).replace(minute=0), NOW - timedelta(minutes=5)):
        for device in (None, "d2"):
            assert_same(store.telemetry_summary(since, device), raw_summary(store, since, device))
    assert roll_up(store) > 0  # the late ones go into their hours, once
    assert store.telemetry_rollup() == 0
    since = NOW - timedelta(hours=7)
    assert_same(store.telemetry_summary(since), raw_summary(store, since))


def test_retention_drops_only_rolled_up_windows_and_hours_keep_counting(store):
    rng = random.Random(2)
    old = NOW - timedelta(hours=72)
    fill(store, rng, 0, 50, old.replace(minute=0), 1800)  # within one whole hour, 72 h ago
    fill(store, rng, 100, 50, NOW - timedelta(hours=1), 1800)
    before = raw_summary(store, old - timedelta(hours=1))
    roll_up(store)
    store.add_telemetry("d1", 5000, [window(old, rng, model="late")], 0, NOW)  # old, but not rolled up yet
    settings = Settings(telemetry_raw_retention_h=48, telemetry_hourly_retention_d=30, telemetry_dedup_retention_h=24)
    p = plan(NOW, settings)
    dropped = store.telemetry_retention(p.raw_before, p.hourly_before, NOW - timedelta(hours=100))
    assert dropped["raw_deleted"] + dropped["partitions_dropped"] > 0
    # The raw windows of 72 h ago are gone but for the late one; their hour still counts in the summary.
    with store.engine.connect() as conn:
        assert conn.execute(sa.text('SELECT model FROM telemetry_windows WHERE "end" < :cut'),
                            {"cut": p.raw_before}).scalars().all() == ["late"]
    after = store.telemetry_summary(old - timedelta(hours=1))
    (late,) = [a for a in after["d1"] if a.model == "late"]
    want = {d: sum(a.count for a in aggs) for d, aggs in before.items()}
    want["d1"] = want.get("d1", 0) + late.count
    assert {d: sum(a.count for a in aggs) for d, aggs in after.items()} == want
    # Hours past their retention go; claims past theirs too (resent now, such a batch would be stored again).
    dropped = store.telemetry_retention(p.raw_before, NOW, NOW + timedelta(seconds=1))  # every claim is of NOW
    assert dropped["hourly_deleted"] > 0 and hourly_rows(store) == 0 and dropped["claims_deleted"] == 101


def test_maintain_telemetry_plans_from_settings_and_is_idempotent(store):
    rng = random.Random(3)
    fill(store, rng, 0, 30, NOW - timedelta(hours=2), 3600)
    settings = Settings(telemetry_partition_days_ahead=3)
    first = maintain_telemetry(store, settings, NOW)
    second = maintain_telemetry(store, settings, NOW)
    assert first.rolled_up == 0 and second.rolled_up > 0  # the second run takes what the first one saw
    assert maintain_telemetry(store, settings, NOW).rolled_up == 0
    if store.engine.dialect.name == "postgresql":
        days = {day for _, day in store.telemetry_partitions()}
        assert {TODAY + timedelta(days=n) for n in range(4)} <= days
    else:
        assert store.telemetry_partitions() == [] and first.partitions_made == []


def partition_rows(store: Store, name: str) -> int:
    with store.engine.connect() as conn:
        return conn.execute(sa.text(f'SELECT count(*) FROM {PARTITION_SCHEMA}."{name}"')).scalar_one()


def test_postgresql_partitions_are_made_ahead_filled_and_dropped_whole(pg_url):
    store = Store.open(pg_url)
    try:
        names = {day: name for name, day in store.telemetry_partitions()}
        assert {TODAY + timedelta(days=n) for n in range(8)} <= set(names)  # migration 0008: today and 7 ahead
        rng = random.Random(4)
        far = TODAY + timedelta(days=20, hours=3)
        store.add_telemetry("d1", 1, [window(far, rng)], 0, NOW)
        assert partition_rows(store, "telemetry_windows_default") == 1  # no partition for that day yet
        made = store.telemetry_partitions_ensure(TODAY + timedelta(days=19), 3)
        assert made == [f"telemetry_windows_p{TODAY + timedelta(days=d):%Y%m%d}" for d in (19, 20, 21)]
        assert partition_rows(store, made[1]) == 1 and partition_rows(store, "telemetry_windows_default") == 0
        assert store.telemetry_partitions_ensure(TODAY + timedelta(days=19), 3) == []
        # An old day: its partition made, filled, rolled up, then dropped whole by retention.
        old_day = TODAY - timedelta(days=5)
        (old_name,) = store.telemetry_partitions_ensure(old_day, 1)
        store.add_telemetry("d1", 2, [window(old_day + timedelta(hours=2), rng) for _ in range(3)], 0, NOW)
        assert partition_rows(store, old_name) == 3
        long_ago = TODAY - timedelta(days=300)
        kept = store.telemetry_retention(TODAY - timedelta(days=2), long_ago, long_ago)
        assert kept["partitions_dropped"] == 0  # not rolled up yet: kept
        roll_up(store)
        dropped = store.telemetry_retention(TODAY - timedelta(days=2), long_ago, long_ago)
        assert dropped["partitions_dropped"] == 1 and old_name not in dict(store.telemetry_partitions())
        # The three windows of the dropped day still count, from their hour; with the far one, four.
        assert sum(a.windows for a in store.telemetry_summary(old_day, "d1")["d1"]) == 4
    finally:
        store.close()


def test_migration_0008_converts_a_0007_database_with_its_windows(db_url):
    from alembic import command

    from edgefleet.cloud.db.session import alembic_config, make_engine

    engine = make_engine(db_url)
    ends = [NOW - timedelta(days=100), NOW - timedelta(days=10), NOW - timedelta(minutes=5)]
    try:
        command.upgrade(alembic_config(engine), "0007")
        with engine.begin() as conn:
            for i, end in enumerate(ends):
                conn.execute(sa.text(
                    'INSERT INTO telemetry_windows (device_id, epoch, seq, model, version, start, "end", count, '
                    'errors, rows, p50_ms, p95_ms, p99_ms, mean_ms, row_ms, mean_mj, row_mj, energy_source, '
                    'energy_meter, energy_method, "where") VALUES (\'d\', 3, :seq, \'a\', 1, :start, :end, 10, 1, '
                    "40, 2.0, 5.0, 7.0, 2.5, 0.5, 1.5, 0.25, 'measured', 'rapl', 'counter', 'local')"),
                    {"seq": i, "start": end - timedelta(seconds=60), "end": end})
            old_ids = [r[0] for r in conn.execute(sa.text("SELECT id FROM telemetry_windows ORDER BY id"))]
        command.upgrade(alembic_config(engine), "head")
        with engine.connect() as conn:
            got = conn.execute(sa.text('SELECT id, seq, count, rows, row_mj FROM telemetry_windows ORDER BY id')).all()
    finally:
        engine.dispose()
    assert [tuple(r) for r in got] == [(old_ids[i], i, 10, 40, 0.25) for i in range(3)]
    s = Store.open(db_url)
    try:
        assert s.add_telemetry("d", 9, [window(NOW, random.Random(5), model="a", version=1)], 0, NOW, epoch=3)
        with s.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT max(id) FROM telemetry_windows")).scalar_one() > max(old_ids)
        (agg,) = [a for a in s.telemetry_summary(NOW - timedelta(days=200), "d")["d"] if a.model == "a"]
        assert agg.windows == 4
        if s.engine.dialect.name == "postgresql":
            days = {day for _, day in s.telemetry_partitions()}
            ten_days_ago = (NOW - timedelta(days=10)).replace(hour=0, minute=0)
            assert ten_days_ago in days and (NOW - timedelta(days=100)).replace(hour=0, minute=0) not in days
            assert partition_rows(s, "telemetry_windows_default") == 1  # the 100-day-old window
    finally:
        s.close()
