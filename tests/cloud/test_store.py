"""cloud/store.py and cloud/db: every test runs on SQLite and on PostgreSQL (the `db_url` fixture), migrated by
Alembic, with real concurrent writers where the store promises safety under concurrency."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from edgefleet.cloud.db.models import Base
from edgefleet.cloud.db.session import migrate
from edgefleet.cloud.errors import Conflict, Invalid, Unavailable
from edgefleet.cloud.store import Store
from edgefleet.protos.limits import (
    INT32_MAX,
    MAX_ENERGY_MJ,
    MAX_LATENCY_MS,
    MAX_ROWS_PER_S,
    MAX_WINDOW_S,
    MAX_WINDOWS_PER_BATCH,
)

NOW = datetime(2025, 5, 1, 10, 0, 0, tzinfo=timezone.utc)


def window(model="m", version=1, end_s=60, p95=5.0) -> dict:
    """A window of 10 single-row requests, as `TelemetryWindow.model_dump()` gives it to the store."""
    return dict(model=model, version=version, start=NOW + timedelta(seconds=end_s - 60),
                end=NOW + timedelta(seconds=end_s), count=10, errors=0, rows=10, p50_ms=2.0, p95_ms=p95, p99_ms=7.0,
                mean_ms=2.0, row_ms=2.0, mean_mj=1.5, row_mj=1.5, energy_source="estimated", energy_meter="modelled",
                where="local")


def run_threads(n: int, target) -> list:
    results, errors = [None] * n, []

    def wrap(i):
        try:
            results[i] = target(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


def test_migration_is_idempotent_and_matches_the_models(db_url):
    engine = migrate(db_url)
    again = migrate(db_url)  # a restart migrates an up-to-date database: no error, no change
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diff == [], f"models and migrations disagree: {diff}"
    finally:
        engine.dispose()
        again.dispose()


def test_bad_urls_are_clear_errors():
    with pytest.raises(Invalid, match="not a database URL"):
        migrate("this is not a url")
    with pytest.raises(Unavailable, match="cannot migrate"):
        migrate("postgresql+psycopg://postgres@127.0.0.1:1/nothing_here")


def test_model_versions_increment_per_name(store):
    spec = [{"name": "x", "dtype": "float32", "shape": [None, 4]}]
    a1 = store.add_model_version("a", sha256="0" * 64, size_bytes=1, opset=17, inputs=spec, outputs=spec, now=NOW)
    a2 = store.add_model_version("a", sha256="1" * 64, size_bytes=2, opset=17, inputs=spec, outputs=spec, now=NOW)
    b1 = store.add_model_version("b", sha256="2" * 64, size_bytes=3, opset=None, inputs=spec, outputs=spec, now=NOW)
    assert (a1.version, a2.version, b1.version) == (1, 2, 1)
    assert store.get_model_version("a").version == 2  # latest
    got = store.get_model_version("a", 1)
    assert got.sha256 == "0" * 64 and got.inputs == spec and got.created_at == NOW
    assert got.created_at.tzinfo is not None  # aware on SQLite too
    assert store.get_model_version("a", 9) is None and store.get_model_version("zzz") is None
    assert [(m.name, m.version) for m in store.list_model_versions()] == [("a", 1), ("a", 2), ("b", 1)]


def test_concurrent_uploads_get_distinct_versions(store):
    spec = [{"name": "x", "dtype": "float32", "shape": [1]}]
    versions = run_threads(8, lambda i: store.add_model_version(
        "race", sha256=f"{i:064x}", size_bytes=i, opset=17, inputs=spec, outputs=spec, now=NOW).version)
    assert sorted(versions) == list(range(1, 9))


def test_counters_are_atomic(store):
    run_threads(6, lambda i: [store.incr("hits") for _ in range(10)])
    store.incr("other", 5)
    assert store.counters() == {"hits": 60, "other": 5}


def test_admin_token_is_made_once(store):
    assert store.add_admin_token_once("a" * 64, NOW) is True
    assert store.add_admin_token_once("b" * 64, NOW) is False
    assert store.find_token("a" * 64).kind == "admin"
    assert store.find_token("b" * 64) is None


def test_enroll_creates_then_rotates_and_refuses_a_class_change(store):
    row, created = store.enroll_device("dev-1", "rpi4", {"site": "a"}, "0.1", "1" * 64, NOW)
    assert created and row.desired_generation == 0 and row.enrolled_at == NOW
    assert store.find_token("1" * 64).device_id == "dev-1"
    row, created = store.enroll_device("dev-1", "rpi4", {"site": "b"}, "0.2", "2" * 64, NOW)
    assert not created and row.labels == {"site": "b"} and row.token_hash == "2" * 64
    assert store.find_token("1" * 64) is None, "the old device token must stop working"
    assert store.find_token("2" * 64).kind == "device"
    with pytest.raises(Conflict, match="enrolled as class 'rpi4'"):
        store.enroll_device("dev-1", "rpi5", {}, "", "3" * 64, NOW)
    assert [d.device_id for d in store.list_devices("rpi4")] == ["dev-1"]
    assert store.list_devices("rpi5") == []


def test_commit_desired_bumps_generation_and_refuses_stale_rules(store):
    store.enroll_device("dev-1", "rpi4", {}, "", "1" * 64, NOW)
    _, mark = store.deployment_rules()
    expires = NOW + timedelta(hours=1)
    gen = store.commit_desired("dev-1", rules_mark=mark, device_class="rpi4", labels={},
                               make_doc=lambda g: ({"generation": g}, expires))
    assert gen == 1
    assert store.commit_desired("dev-1", rules_mark=mark, device_class="rpi4", labels={},
                                make_doc=lambda g: ({"generation": g}, expires)) == 2
    store.add_deployment(model="m", version=1, target_kind="device", target="dev-1", device_ids=["dev-1"],
                         bundle_ids=[], now=NOW)
    # A rule made after the caller computed the document: nothing is written.
    assert store.commit_desired("dev-1", rules_mark=mark, device_class="rpi4", labels={},
                                make_doc=lambda g: pytest.fail("must not sign")) is None
    _, mark2 = store.deployment_rules()
    assert store.commit_desired("dev-1", rules_mark=mark2, device_class="rpi4", labels={"x": "y"},
                                make_doc=lambda g: pytest.fail("labels changed")) is None
    row = store.get_device("dev-1")
    assert row.desired_generation == 2 and row.desired_doc == {"generation": 2} and row.desired_expires_at == expires
    assert store.devices_expiring_before(expires + timedelta(seconds=1)) == ["dev-1"]
    assert store.devices_expiring_before(expires - timedelta(seconds=1)) == []


def test_concurrent_commits_never_reuse_a_generation(store):
    store.enroll_device("dev-1", "rpi4", {}, "", "1" * 64, NOW)
    _, mark = store.deployment_rules()
    gens = run_threads(6, lambda i: store.commit_desired(
        "dev-1", rules_mark=mark, device_class="rpi4", labels={}, make_doc=lambda g: ({"g": g}, NOW)))
    assert sorted(gens) == [1, 2, 3, 4, 5, 6]
    assert store.get_device("dev-1").desired_doc == {"g": 6}


def test_deployments_keep_devices_and_bundles(store):
    bundle = store.add_bundle(model="m", version=1, device_class="rpi4", target_path="bundles/m/v1/rpi4.tar.gz",
                              sha256="a" * 64, size_bytes=10, manifest={"k": 1}, now=NOW)
    again = store.add_bundle(model="m", version=1, device_class="rpi4", target_path="bundles/m/v1/rpi4.tar.gz",
                             sha256="a" * 64, size_bytes=10, manifest={"k": 1}, now=NOW)
    assert again.id == bundle.id  # a second builder gets the recorded one
    assert store.get_bundle_by_target("bundles/m/v1/rpi4.tar.gz").id == bundle.id
    dep = store.add_deployment(model="m", version=1, target_kind="device_class", target="rpi4",
                               device_ids=["b", "a"], bundle_ids=[bundle.id], now=NOW)
    store.add_deployment(model="m", version=1, target_kind="label", target="site=x", device_ids=[], bundle_ids=[],
                         now=NOW)
    listed = store.list_deployments()
    assert [(d.id, devs, [b.id for b in bs]) for d, devs, bs in listed] == [
        (dep.id, ["a", "b"], [bundle.id]), (listed[1][0].id, [], [])]
    rules, mark = store.deployment_rules()
    assert [r.target_kind for r in rules] == ["device_class", "label"] and mark == (2, listed[1][0].id)


def test_telemetry_replay_is_a_no_op(store):
    assert store.add_telemetry("dev-1", 7, [window(end_s=60), window(end_s=120, p95=9.0)], 0, NOW) is True
    assert store.add_telemetry("dev-1", 7, [window(end_s=180)], 0, NOW) is False  # same seq: outbox replay
    assert store.add_telemetry("dev-2", 7, [window(end_s=60)], 0, NOW) is True  # seq is per device
    summary = store.telemetry_summary(NOW)
    assert [(w.model, w.version, w.count) for w in summary["dev-1"]] == [("m", 1, 20)]  # not 30: replay ignored
    assert summary["dev-1"][0].end == NOW + timedelta(seconds=120)
    assert set(store.telemetry_summary(NOW, "dev-2")) == {"dev-2"}


def test_telemetry_summary_is_per_model_version(store):
    store.add_telemetry("d", 1, [window("a", 1, 60), window("a", 2, 60, p95=3.0), window("b", 1, 30)], 0, NOW)
    store.add_telemetry("d", 2, [window("a", 2, 120, p95=4.0)], 0, NOW)
    summary = store.telemetry_summary(NOW - timedelta(seconds=60), "d")["d"]
    got = [(w.model, w.version, w.count, w.p95_ms) for w in summary]
    assert got == [("a", 1, 10, 5.0), ("a", 2, 20, 3.5), ("b", 1, 10, 5.0)]


def issue_generations(store, device_id: str, n: int) -> None:
    _, mark = store.deployment_rules()
    for _ in range(n):
        store.commit_desired(device_id, rules_mark=mark, device_class="rpi4", labels={},
                             make_doc=lambda g: ({"generation": g}, NOW + timedelta(hours=1)))


def test_reported_state_ignores_older_reports(store):
    store.enroll_device("d", "rpi4", {}, "", "1" * 64, NOW)
    issue_generations(store, "d", 3)
    assert store.set_reported("nobody", doc={}, generation=1, last_error=None, reported_at=NOW, now=NOW) == "unknown"
    assert store.set_reported("d", doc={"g": 3}, generation=3, last_error="boom", reported_at=NOW, now=NOW) == "stored"
    assert store.set_reported("d", doc={"g": 2}, generation=2, last_error=None, reported_at=NOW, now=NOW) == "stale"
    earlier = NOW - timedelta(seconds=5)
    assert store.set_reported("d", doc={"g": 3, "old": 1}, generation=3, last_error=None, reported_at=earlier,
                              now=NOW) == "stale"
    row = store.get_device("d")
    assert row.reported_doc == {"g": 3} and row.last_error == "boom" and row.last_seen == NOW


def test_a_reported_generation_the_cloud_never_issued_is_refused_and_changes_nothing(store):
    # A forged report with generation 2^31-1 used to be stored, and every real report after it was "stale".
    store.enroll_device("d", "rpi4", {}, "", "1" * 64, NOW)
    issue_generations(store, "d", 2)
    assert store.set_reported("d", doc={"g": 2}, generation=2, last_error=None, reported_at=NOW, now=NOW) == "stored"
    later = NOW + timedelta(seconds=5)
    assert store.set_reported("d", doc={"forged": 1}, generation=2**31 - 1, last_error="x", reported_at=later,
                              now=later) == "ahead"
    row = store.get_device("d")
    assert (row.reported_doc, row.reported_generation, row.last_error, row.last_seen) == ({"g": 2}, 2, None, NOW)
    issue_generations(store, "d", 1)  # the next real generation, 3, and the report of it
    assert store.set_reported("d", doc={"g": 3}, generation=3, last_error=None, reported_at=later,
                              now=later) == "stored"
    assert store.get_device("d").reported_generation == 3


def test_online_status_and_classes(store):
    store.enroll_device("d", "rpi4", {}, "", "1" * 64, NOW)
    assert store.set_online("d", True, NOW) is True
    assert store.set_online("ghost", True, NOW) is False
    assert store.get_device("d").online is True
    store.put_class("mine", {"name": "mine", "cores": 1}, NOW)
    store.put_class("mine", {"name": "mine", "cores": 2}, NOW)
    assert store.list_classes() == {"mine": {"name": "mine", "cores": 2}}


def test_telemetry_summary_rolls_windows_up_over_the_look_back(store):
    # Two windows of model a v1 (counts 10 and 30), one too old to count, and another device.
    old = window("a", 1, 10, p95=100.0)
    w1 = {**window("a", 1, 60, p95=2.0), "count": 10, "p50_ms": 1.0, "mean_mj": 4.0}
    w2 = {**window("a", 1, 120, p95=6.0), "count": 30, "rows": 30, "p50_ms": 3.0, "mean_mj": 8.0, "errors": 2}
    store.add_telemetry("d", 1, [old], 0, NOW)
    store.add_telemetry("d", 2, [w1, w2], 0, NOW)
    store.add_telemetry("e", 1, [window("a", 1, 60)], 0, NOW)
    got = store.telemetry_summary(NOW + timedelta(seconds=30), "d")
    assert list(got) == ["d"]
    (agg,) = got["d"]
    assert (agg.model, agg.version, agg.count, agg.errors) == ("a", 1, 40, 2)
    # Per-request figures are means over the successful requests: weighted by them (10, and 30 - 2 errors).
    assert agg.p50_ms == pytest.approx((1.0 * 10 + 3.0 * 28) / 38)
    assert agg.p95_ms == pytest.approx((2.0 * 10 + 6.0 * 28) / 38)
    assert agg.mean_mj == pytest.approx((4.0 * 10 + 8.0 * 28) / 38)
    assert agg.end == NOW + timedelta(seconds=120)
    assert set(store.telemetry_summary(NOW)) == {"d", "e"}
    assert store.telemetry_summary(NOW + timedelta(seconds=500)) == {}


def test_the_rolled_up_energy_label_is_the_weaker_of_the_metered_windows(store):
    """"none" sorts after "measured": a max() over the labels relabelled a measured device by its one unmetered
    window. The label is "estimated" when any metered window was, "measured" when all were, else "none"."""
    bare = {**window("a", 1, 60), "mean_mj": None, "row_mj": None, "energy_source": "none"}
    measured = {**window("a", 1, 120), "energy_source": "measured", "energy_meter": "rapl"}
    store.add_telemetry("d", 1, [bare, measured], 0, NOW)
    store.add_telemetry("e", 1, [bare], 0, NOW)
    store.add_telemetry("f", 1, [measured, {**window("a", 1, 180)}], 0, NOW)
    got = store.telemetry_summary(NOW - timedelta(seconds=60))
    assert {d: [a.energy_source for a in aggs] for d, aggs in got.items()} == {
        "d": ["measured"], "e": ["none"], "f": ["estimated"]}


@pytest.mark.parametrize("bad", [{"p95_ms": 1e308}, {"p95_ms": float("nan")}, {"p50_ms": float("inf")},
                                 {"mean_mj": -1.0}, {"p99_ms": -5.0}, {"errors": 11}, {"rows": 9},
                                 {"row_mj": -1.0}, {"row_ms": 1e308}],
                         ids=["p95-1e308", "nan", "inf", "negative-energy", "negative-latency", "errors>count",
                              "rows<count", "negative-row-energy", "row-latency-1e308"])
def test_telemetry_summary_leaves_out_rows_outside_the_contract(store, bad):
    # Rows stored before the contract had limits. On PostgreSQL the 1e308 one made the roll-up overflow, so every
    # listing answered 503 until the row was removed by hand; on SQLite it turned the aggregate into inf.
    store.add_telemetry("d", 1, [window("a", 1, 60, p95=5.0)], 0, NOW)
    store.add_telemetry("d", 2, [{**window("a", 1, 60), **bad}], 0, NOW)
    (agg,) = store.telemetry_summary(NOW)["d"]
    # SQLite stores NaN as NULL: that row then reads as a window without a p95, so its count still adds up.
    nan_on_sqlite = store.engine.dialect.name == "sqlite" and any(v != v for v in bad.values())
    count = 20 if nan_on_sqlite else 10
    assert (agg.count, agg.errors, agg.p50_ms, agg.p95_ms, agg.p99_ms, agg.mean_mj) == (count, 0, 2.0, 5.0, 7.0, 1.5)


def test_telemetry_summary_holds_the_largest_values_the_contract_admits(store):
    # 1000 windows at every ceiling at once: the weighted sums stay finite and exact enough on both databases.
    top = {"count": INT32_MAX, "errors": INT32_MAX - 1, "p50_ms": MAX_LATENCY_MS, "p95_ms": MAX_LATENCY_MS,
           "p99_ms": MAX_LATENCY_MS, "mean_mj": MAX_ENERGY_MJ, "rows": MAX_ROWS_PER_S * MAX_WINDOW_S,
           "mean_ms": MAX_LATENCY_MS, "row_ms": MAX_LATENCY_MS, "row_mj": MAX_ENERGY_MJ}
    for seq in range(5):
        store.add_telemetry("d", seq, [{**window("a", 1, 60), **top}] * MAX_WINDOWS_PER_BATCH, 0, NOW)
    (agg,) = store.telemetry_summary(NOW)["d"]
    n = 5 * MAX_WINDOWS_PER_BATCH
    assert (agg.count, agg.errors) == (n * INT32_MAX, n * (INT32_MAX - 1))
    assert agg.p50_ms == pytest.approx(MAX_LATENCY_MS) and agg.p95_ms == pytest.approx(MAX_LATENCY_MS)
    assert agg.p99_ms == MAX_LATENCY_MS and agg.mean_mj == pytest.approx(MAX_ENERGY_MJ)
    assert agg.rows == n * MAX_ROWS_PER_S * MAX_WINDOW_S and agg.windows == n
    assert agg.row_ms == pytest.approx(MAX_LATENCY_MS) and agg.row_mj == pytest.approx(MAX_ENERGY_MJ)


# -- rows: a batched request is as many inferences as it has rows -------------------------------------------------


def test_telemetry_summary_weighs_per_row_figures_by_rows(store):
    # The issue's rpi4 window: 10 requests of 1,200 rows at 110 ms and 708 mJ each, next to 30 single rows.
    batched = {**window("a", 1, 60), "count": 10, "rows": 12_000, "p50_ms": 110.0, "p95_ms": 120.0, "p99_ms": 130.0,
               "mean_ms": 110.0, "row_ms": 110.0 / 1200, "mean_mj": 708.0, "row_mj": 708.0 / 1200}
    single = {**window("a", 1, 120), "count": 30, "rows": 30, "p50_ms": 0.2, "p95_ms": 0.3, "p99_ms": 0.4,
              "mean_ms": 0.25, "row_ms": 0.25, "mean_mj": 1.0, "row_mj": 1.0}
    store.add_telemetry("d", 1, [batched, single], 0, NOW)
    (agg,) = store.telemetry_summary(NOW)["d"]
    assert (agg.count, agg.rows, agg.windows) == (40, 12_030, 2) and agg.batch == pytest.approx(12_030 / 40)
    assert agg.row_mj == pytest.approx((10 * 708.0 + 30 * 1.0) / 12_030)  # per inference: 0.59 mJ, not 177
    assert agg.row_ms == pytest.approx((10 * 110.0 + 30 * 0.25) / 12_030)
    assert agg.mean_mj == pytest.approx((10 * 708.0 + 30 * 1.0) / 40)  # per request, as before
    assert agg.mean_ms == pytest.approx((10 * 110.0 + 30 * 0.25) / 40)


def test_telemetry_summary_can_leave_out_windows_of_too_few_rows(store):
    small = {**window("a", 1, 60), "count": 3, "rows": 3, "row_ms": 50.0, "mean_ms": 50.0, "p50_ms": 50.0,
             "p95_ms": 60.0, "p99_ms": 70.0}
    big = {**window("a", 1, 120), "count": 10, "rows": 400, "row_ms": 0.5, "mean_ms": 20.0}
    store.add_telemetry("d", 1, [small, big], 0, NOW)
    store.add_telemetry("e", 1, [{**small, "model": "b"}], 0, NOW)
    (agg,) = store.telemetry_summary(NOW, min_rows=100)["d"]
    assert (agg.count, agg.rows, agg.windows, agg.row_ms) == (10, 400, 1, 0.5)
    assert set(store.telemetry_summary(NOW, min_rows=100)) == {"d"}  # e's only window is too small
    assert store.telemetry_summary(NOW)["d"][0].rows == 403


def test_migration_0006_reads_windows_stored_before_it_as_batch_one(db_url):
    """A window an older cloud stored (no rows) becomes rows = count with the request figures as per-row ones."""
    import sqlalchemy as sa
    from alembic import command

    from edgefleet.cloud.db.session import alembic_config, make_engine

    engine = make_engine(db_url)
    try:
        command.upgrade(alembic_config(engine), "0005")
        with engine.begin() as conn:
            conn.execute(sa.text(
                'INSERT INTO telemetry_windows (device_id, seq, model, version, start, "end", count, errors, '
                'p50_ms, p95_ms, p99_ms, mean_mj, energy_source, energy_meter, "where") VALUES '
                "('d', 1, 'a', 1, :start, :end, 25, 1, 2.0, 5.0, 7.0, 1.5, 'estimated', 'modelled', 'local')"),
                {"start": NOW, "end": NOW + timedelta(seconds=60)})
        command.upgrade(alembic_config(engine), "head")
    finally:
        engine.dispose()
    s = Store.open(db_url)
    try:
        (agg,) = s.telemetry_summary(NOW)["d"]
        assert (agg.count, agg.errors, agg.rows, agg.windows) == (25, 1, 25, 1)
        assert (agg.mean_ms, agg.row_ms, agg.row_mj, agg.mean_mj) == (2.0, 2.0, 1.5, 1.5)
        assert s.add_telemetry("d", 2, [window("a", 1, 120)], 0, NOW)  # and new windows go in beside it
        assert s.telemetry_summary(NOW)["d"][0].rows == 35
    finally:
        s.close()
