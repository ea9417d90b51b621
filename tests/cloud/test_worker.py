"""cloud/worker.py: the worker loop in-process (outcomes, cancel, a lease lost to another worker, shutdown,
heartbeats) on SQLite and PostgreSQL, and real `edgefleet-cloud worker` processes, one of them killed with SIGKILL
mid-job while another picks the job up and finishes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from edgefleet.cloud.services import Fleet
from edgefleet.cloud.settings import Settings
from edgefleet.cloud.worker import Worker
from tests import job_kinds  # noqa: F401 - registers the test-only kinds
from tests.harness import wait_for

ROOT = Path(__file__).resolve().parents[2]  # the repo root: `tests.job_kinds` imports from it
CLI = [sys.executable, "-m", "edgefleet.cloud.main", "worker"]


@pytest.fixture
def fleet(tmp_path: Path, db_url: str):
    f = Fleet.from_settings(Settings(data_dir=tmp_path / "data", database_url=db_url, job_lease_s=0.9,
                                     worker_poll_s=0.05))
    try:
        yield f
    finally:
        f.store.close()


def submit(fleet: Fleet, kind: str, **spec) -> int:
    return fleet.store.enqueue_job(kind, spec=spec, inputs={}, max_attempts=3,
                                   now=datetime.now(timezone.utc)).id


def worker(fleet: Fleet, name: str = "w1") -> Worker:
    return Worker.from_fleet(fleet, name, kinds=("test-echo", "test-spin", "test-gate"))


def in_thread(w: Worker) -> threading.Thread:
    t = threading.Thread(target=w.run_once, daemon=True)
    t.start()
    return t


def lines(fleet: Fleet, job_id: int) -> list[str]:
    return [x.line for x in fleet.job_logs(job_id).lines]


def test_outcomes_success_invalid_and_crash(fleet):
    ok, invalid, crash = (submit(fleet, "test-echo", n=1), submit(fleet, "test-echo", fail="invalid"),
                          submit(fleet, "test-echo", fail="crash"))
    worker(fleet).run_forever(once=True)
    job = fleet.get_job(ok)
    assert (job.state, job.progress, job.attempts, job.worker) == ("succeeded", 1.0, 1, "w1")
    assert fleet.store.get_job(ok).result == {"echo": {"n": 1}}
    assert "echo (50%)" in lines(fleet, ok)
    job = fleet.get_job(invalid)
    assert (job.state, job.error) == ("failed", "the spec asked to fail: fix the spec")
    job = fleet.get_job(crash)
    assert (job.state, job.error) == ("failed", "ValueError: boom")
    assert lines(fleet, crash)[-1] == "failed: ValueError: boom"


def test_cancel_stops_a_running_job_at_its_next_progress_report(fleet):
    job_id = submit(fleet, "test-spin")
    t = in_thread(worker(fleet))
    wait_for(lambda: fleet.get_job(job_id).stage == "spin", 10, what="the job to spin")
    assert "spinning up" in lines(fleet, job_id)  # a log record of edgefleet.cloud.distill.* lands in the job log
    assert fleet.cancel_job(job_id).cancel_requested
    t.join(10)
    assert not t.is_alive()
    job = fleet.get_job(job_id)
    assert (job.state, job.error) == ("cancelled", None)


def test_heartbeats_keep_the_lease_and_a_lost_lease_stops_the_old_worker(fleet):
    job_id = submit(fleet, "test-spin")
    t = in_thread(worker(fleet, "old"))
    wait_for(lambda: fleet.get_job(job_id).stage == "spin", 10, what="the job to spin")
    first_lease = fleet.get_job(job_id).lease_until
    # Three lease lengths later the job is still ours: the heartbeat renewed it (0.9 s lease, renewed every 0.3 s).
    wait_for(lambda: fleet.get_job(job_id).lease_until > first_lease + timedelta(seconds=2.7), 10,
             what="three renewals")
    assert fleet.store.claim_job("thief", kinds=["test-spin"], lease_s=0.9, now=datetime.now(timezone.utc)) is None
    # A claimer whose clock says the lease ran out (as after a long pause of the old worker) takes the job over;
    # the old worker learns at its next renewal and stops without touching the job.
    later = datetime.now(timezone.utc) + timedelta(seconds=60)
    assert fleet.store.claim_job("thief", kinds=["test-spin"], lease_s=600, now=later).id == job_id
    t.join(10)
    assert not t.is_alive()
    job = fleet.get_job(job_id)
    assert (job.state, job.worker, job.attempts, job.finished_at) == ("running", "thief", 2, None)


def test_shutdown_releases_the_running_job(fleet):
    job_id = submit(fleet, "test-spin")
    w = worker(fleet)
    t = threading.Thread(target=w.run_forever, daemon=True)
    t.start()
    wait_for(lambda: fleet.get_job(job_id).stage == "spin", 10, what="the job to spin")
    w.stopping.set()
    t.join(10)
    assert not t.is_alive()
    job = fleet.get_job(job_id)
    assert (job.state, job.worker, job.attempts) == ("queued", None, 0)
    assert "back in the queue" in lines(fleet, job_id)[-1]


# -------------------------------------------------------------------------------------------- real processes


def start_worker(data_dir: Path, db_url: str, name: str, *, gated_distill: bool = False) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    # 1.5 s lease: the test waits about that long for the killed worker's job to be free again.
    env |= {"EDGEFLEET_DATABASE_URL": db_url, "EDGEFLEET_JOB_LEASE_S": "1.5", "EDGEFLEET_WORKER_POLL_S": "0.1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])}
    if gated_distill:
        env["EDGEFLEET_TEST_GATED_DISTILL"] = "1"
    log = open(data_dir.parent / f"{name}.log", "ab")
    return subprocess.Popen([*CLI, "--data-dir", str(data_dir), "--id", name, "--plugin", "tests.job_kinds"],
                            stdout=log, stderr=log, env=env)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_a_killed_workers_job_is_finished_by_another_worker(tmp_path: Path, db_url: str):
    data_dir = tmp_path / "data"
    fleet = Fleet.from_settings(Settings(data_dir=data_dir, database_url=db_url))
    job_id = submit(fleet, "test-gate", gate=str(tmp_path / "never"))
    first = start_worker(data_dir, db_url, "first")
    second = None
    try:
        wait_for(lambda: fleet.get_job(job_id).stage == "gated", 30, what="the first worker to start the job")
        assert fleet.get_job(job_id).worker == "first"
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        second = start_worker(data_dir, db_url, "second")
        job = wait_for(lambda: (j := fleet.get_job(job_id)).finished and j, 30, what="the second worker to finish")
        assert (job.state, job.worker, job.attempts) == ("succeeded", "second", 2)
        assert fleet.store.get_job(job_id).result == {"attempt": 2, "worker": "second"}
        assert "attempt 2/3 claimed by second; worker first lost its lease" in lines(fleet, job_id)
    finally:
        stop(first)
        if second is not None:
            stop(second)
        fleet.store.close()


def test_a_worker_killed_while_distilling_loses_nothing(tmp_path: Path, db_url: str):
    """The real distill job: the first worker is SIGKILLed while it trains (attempt 1 holds once training is a third
    done, see job_kinds.gated_distill); a second worker claims the job when the lease runs out and builds it."""
    from edgefleet.protos.jobs import DistillSubmit
    from tests.job_kinds import tiny_teacher, tiny_transfer

    data_dir = tmp_path / "data"
    fleet = Fleet.from_settings(Settings(data_dir=data_dir, database_url=db_url))
    job_id = fleet.submit_distill(DistillSubmit(name="tiny", classes=["x86-cpu"], max_epochs=3, max_candidates=1),
                                  tiny_teacher(), tiny_transfer()).id
    first = start_worker(data_dir, db_url, "first", gated_distill=True)
    second = None
    try:
        wait_for(lambda: fleet.get_job(job_id).stage.startswith("killable"), 60, what="the first worker to train")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        second = start_worker(data_dir, db_url, "second")
        job = wait_for(lambda: (j := fleet.get_job(job_id)).finished and j, 120, what="the second worker to finish")
        assert (job.state, job.worker, job.attempts) == ("succeeded", "second", 2), job.error
        assert [(v.device_class, v.model, v.version) for v in job.versions] == [("x86-cpu", "tiny", 1)]
        assert fleet.store.get_model_version("tiny", 1).job_id == job_id
        assert "attempt 2/3 claimed by second; worker first lost its lease" in lines(fleet, job_id)
    finally:
        stop(first)
        if second is not None:
            stop(second)
        fleet.store.close()
