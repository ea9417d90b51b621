"""The jobs queue in cloud/store_jobs.py, on SQLite and PostgreSQL (the `db_url` fixture), migrated by Alembic:
claims by concurrent claimers with their own connections, lease expiry, the attempts cap, fencing, cancel, release,
logs and calibrations."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

from edgefleet.cloud.store import Store

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
LEASE = 10.0


def enqueue(store: Store, n: int = 1, kind: str = "distill", max_attempts: int = 3) -> list[int]:
    return [store.enqueue_job(kind, spec={"i": i}, inputs={}, max_attempts=max_attempts, now=T0).id
            for i in range(n)]


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_claim_takes_the_oldest_queued_job_of_a_known_kind(store):
    assert store.claim_job("w1", kinds=["distill"], lease_s=LEASE, now=T0) is None  # empty queue
    other = enqueue(store, kind="other")[0]
    first, second = enqueue(store, 2)
    job = store.claim_job("w1", kinds=["distill"], lease_s=LEASE, now=at(1))
    assert (job.id, job.state, job.worker, job.attempts) == (first, "running", "w1", 1)
    assert job.lease_until == at(1 + LEASE) and job.started_at == at(1)
    assert store.claim_job("w2", kinds=["distill"], lease_s=LEASE, now=at(2)).id == second
    assert store.claim_job("w3", kinds=["distill"], lease_s=LEASE, now=at(3)) is None  # "other" is not ours
    assert store.get_job(other).state == "queued"
    assert [x.line for x in store.job_log(first)] == ["queued (distill)", "attempt 1/3 claimed by w1"]


def test_concurrent_claimers_never_share_a_job(db_url):
    """Eight claimers, each with its own engine (its own connections, as separate processes would have), race
    for thirty jobs: every job is claimed exactly once."""
    setup = Store.open(db_url)
    ids = enqueue(setup, 30)
    stores = [Store.open(db_url) for _ in range(8)]
    claimed: dict[int, list[int]] = {i: [] for i in range(8)}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def claimer(i: int) -> None:
        try:
            start.wait(10)
            while (job := stores[i].claim_job(f"w{i}", kinds=["distill"], lease_s=LEASE, now=at(1))) is not None:
                claimed[i].append(job.id)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        every = [j for got in claimed.values() for j in got]
        assert sorted(every) == sorted(ids), "a job was claimed twice or not at all"
        assert all(setup.get_job(j).attempts == 1 for j in ids)
    finally:
        for s in stores:
            s.close()
        setup.close()


def test_a_job_whose_lease_ran_out_is_claimed_again_and_the_old_worker_is_fenced_off(store):
    job_id = enqueue(store)[0]
    store.claim_job("dead", kinds=["distill"], lease_s=LEASE, now=T0)
    assert store.claim_job("w2", kinds=["distill"], lease_s=LEASE, now=at(LEASE - 1)) is None  # still leased
    assert store.renew_lease(job_id, "dead", 1, lease_s=LEASE, now=at(5))  # renewed: good until 15
    assert store.claim_job("w2", kinds=["distill"], lease_s=LEASE, now=at(14)) is None
    job = store.claim_job("w2", kinds=["distill"], lease_s=LEASE, now=at(16))
    assert (job.id, job.worker, job.attempts, job.started_at) == (job_id, "w2", 2, T0)
    # The old owner wakes up: every write it tries is refused, and the new owner's job is untouched.
    assert not store.renew_lease(job_id, "dead", 1, lease_s=LEASE, now=at(17))
    assert store.set_job_progress(job_id, "dead", 1, stage="x", progress=0.5, now=at(17)) == (False, False)
    assert not store.finish_job(job_id, "dead", 1, state="succeeded", result={"x": 1}, error=None, now=at(17))
    assert store.finish_job(job_id, "w2", 2, state="succeeded", result={"ok": True}, error=None, now=at(18))
    done = store.get_job(job_id)
    assert (done.state, done.result, done.progress, done.lease_until) == ("succeeded", {"ok": True}, 1.0, None)
    lines = [x.line for x in store.job_log(job_id)]
    assert "attempt 2/3 claimed by w2; worker dead lost its lease" in lines
    assert lines[-1] == "succeeded"


def test_attempts_are_capped(store):
    job_id = enqueue(store, max_attempts=2)[0]
    assert store.claim_job("w1", kinds=["distill"], lease_s=LEASE, now=T0).attempts == 1
    assert store.claim_job("w2", kinds=["distill"], lease_s=LEASE, now=at(11)).attempts == 2
    later = enqueue(store)[0]
    # The third claim finds the first job out of attempts: it fails it, and takes the next job instead.
    job = store.claim_job("w3", kinds=["distill"], lease_s=LEASE, now=at(22))
    assert job.id == later
    failed = store.get_job(job_id)
    assert failed.state == "failed" and failed.finished_at == at(22)
    assert "lost 2 time(s)" in failed.error and "limit of 2 attempts" in failed.error and "w2" in failed.error


def test_cancel_queued_running_and_finished(store):
    running, queued, done = enqueue(store, 3)
    assert store.claim_job("w", kinds=["distill"], lease_s=LEASE, now=T0).id == running
    row = store.request_cancel(queued, at(1))
    assert (row.state, row.finished_at) == ("cancelled", at(1))  # never started: cancelled at once
    row = store.request_cancel(running, at(1))
    assert (row.state, row.cancel_requested) == ("running", True)  # flagged; the worker sees it at its next report
    assert store.set_job_progress(running, "w", 1, stage="train", progress=0.3, now=at(2)) == (True, True)
    assert store.finish_job(running, "w", 1, state="cancelled", result=None, error=None, now=at(3))
    assert store.get_job(running).state == "cancelled"
    assert store.claim_job("w", kinds=["distill"], lease_s=LEASE, now=at(4)).id == done
    store.finish_job(done, "w", 1, state="succeeded", result={}, error=None, now=at(5))
    assert store.request_cancel(done, at(6)).state == "succeeded"  # unchanged; the Fleet answers 409
    assert store.request_cancel(9999, at(6)) is None


def test_a_cancelled_job_whose_worker_died_is_closed_not_rerun(store):
    job_id = enqueue(store)[0]
    store.claim_job("dead", kinds=["distill"], lease_s=LEASE, now=T0)
    store.request_cancel(job_id, at(1))
    assert store.claim_job("w2", kinds=["distill"], lease_s=LEASE, now=at(20)) is None
    assert store.get_job(job_id).state == "cancelled"


def test_release_puts_the_job_back_without_counting_the_attempt(store):
    job_id = enqueue(store)[0]
    store.claim_job("w1", kinds=["distill"], lease_s=LEASE, now=T0)
    assert store.release_job(job_id, "w1", 1, now=at(1))
    row = store.get_job(job_id)
    assert (row.state, row.worker, row.attempts) == ("queued", None, 0)
    assert store.claim_job("w2", kinds=["distill"], lease_s=LEASE, now=at(2)).attempts == 1


def test_logs_page_by_offset(store):
    job_id = enqueue(store)[0]
    for i in range(5):
        store.append_job_log(job_id, 1, f"line {i}", at(i))
    store.append_job_log(job_id, 1, "x" * 100_000, at(9))
    lines = store.job_log(job_id)
    assert [x.line for x in lines[:6]] == ["queued (distill)"] + [f"line {i}" for i in range(5)]
    assert len(lines[-1].line) == 64 * 1024  # cut, not stored whole
    assert [x.line for x in store.job_log(job_id, since=4)][:2] == ["line 3", "line 4"]
    assert store.job_log(job_id, since=100) == []


def test_calibrations_upsert(store):
    assert store.calibrations() == {}
    store.put_calibration("rpi4", {"overhead_ms": 1.0}, T0)
    store.put_calibration("rpi4", {"overhead_ms": 2.0}, at(1))
    store.put_calibration("rpi5", {"overhead_ms": 3.0}, at(1))
    assert store.calibrations() == {"rpi4": {"overhead_ms": 2.0}, "rpi5": {"overhead_ms": 3.0}}
