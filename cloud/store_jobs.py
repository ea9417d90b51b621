"""The jobs queue and the class calibrations in SQL: a part of `Store` (mixed into it), kept in its own file.

Theory of the queue: a job row is owned by the worker named in `worker` while `lease_until` is in the future. A
claim is one transaction that picks the oldest job that is queued, or running with a lease that ran out (its
worker died or hung), and makes it running under the claimer with attempts + 1. On PostgreSQL the pick is
`SELECT ... FOR UPDATE SKIP LOCKED`, so concurrent claimers on many machines take different rows without waiting
on each other; on SQLite every transaction starts with BEGIN IMMEDIATE (db/session.py), so claims are serialised
by the database's write lock and two claimers can never read the same free row. A job whose lease ran out after
`max_attempts` claims is failed in the claim instead of being run again: something in it kills workers.

Every write a worker makes afterwards (lease renewal, progress, result) is fenced on (id, worker, attempts,
state=running): a worker that lost its lease (paused past it, then resumed) finds zero rows to update and stops,
so it can never overwrite the new owner's job. Lease times come from the callers' clocks, which must agree within
a small part of the lease (NTP).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update

from edgefleet.cloud.db.models import ClassCalibration, Job, JobLogLine

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from sqlalchemy.orm import Session

# 64 KiB: a log line is a sentence; a runaway message (a whole traceback of a data dump) is cut, not stored.
MAX_LOG_LINE_CHARS = 64 * 1024
# 1000 lines per read: a follower catches up in a few round trips, a reader never loads a huge log in one answer.
MAX_LOG_PAGE = 1000


class JobStoreMixin:
    """Queue and calibration queries; needs `_tx()` and `_insert()` from `Store`."""

    if TYPE_CHECKING:
        _dialect: str

        def _tx(self) -> AbstractContextManager[Session]: ...

        def _insert(self, table: Any) -> Any: ...

    # ------------------------------------------------------------------------------------------------ queue

    def enqueue_job(self, kind: str, *, spec: dict[str, Any], inputs: dict[str, str], max_attempts: int,
                    now: datetime) -> Job:
        with self._tx() as s:
            row = Job(kind=kind, state="queued", spec=spec, inputs=inputs, attempts=0, max_attempts=max_attempts,
                      progress=0.0, stage="queued", cancel_requested=False, created_at=now)
            s.add(row)
            s.flush()
            s.add(JobLogLine(job_id=row.id, at=now, attempt=0, line=f"queued ({kind})"))
        return row

    def claim_job(self, worker: str, *, kinds: list[str], lease_s: float, now: datetime) -> Job | None:
        """Take the oldest claimable job of one of `kinds` for `worker`, or None when there is none."""
        claimable = (Job.state == "queued") | ((Job.state == "running") & (Job.lease_until < now))
        query = (select(Job).where(Job.kind.in_(kinds), claimable).order_by(Job.id).limit(1)
                 .with_for_update(skip_locked=True))  # SQLite ignores FOR UPDATE; BEGIN IMMEDIATE serialises it
        with self._tx() as s:
            # A loop, not one pick: rows past their attempts (or cancelled while their worker was gone) are closed
            # here and the next row is tried, in the same transaction.
            while (row := s.scalar(query)) is not None:
                lost = row.state == "running"
                if lost and row.cancel_requested:
                    self._close(s, row, "cancelled", None, f"cancelled; worker {row.worker} was lost", now)
                    continue
                if lost and row.attempts >= row.max_attempts:
                    error = (f"the job's worker was lost {row.attempts} time(s) (last: {row.worker}, lease ran out "
                             f"at {row.lease_until:%Y-%m-%d %H:%M:%S} UTC) and it reached its limit of "
                             f"{row.max_attempts} attempts; check the workers' logs (out of memory?) and submit "
                             "it again")
                    self._close(s, row, "failed", error, error, now)
                    continue
                note = f"; worker {row.worker} lost its lease" if lost else ""
                row.state, row.worker = "running", worker
                row.attempts += 1
                row.lease_until = now + timedelta(seconds=lease_s)
                row.started_at = row.started_at or now
                row.heartbeat_at = now
                row.stage, row.progress = "starting", 0.0
                s.add(JobLogLine(job_id=row.id, at=now, attempt=row.attempts,
                                 line=f"attempt {row.attempts}/{row.max_attempts} claimed by {worker}{note}"))
                return row
        return None

    @staticmethod
    def _close(s: Session, row: Job, state: str, error: str | None, line: str, now: datetime) -> None:
        row.state, row.error, row.finished_at, row.lease_until = state, error, now, None
        s.add(JobLogLine(job_id=row.id, at=now, attempt=row.attempts, line=line[:MAX_LOG_LINE_CHARS]))

    @staticmethod
    def _fenced(job_id: int, worker: str, attempt: int) -> Any:
        return update(Job).where(Job.id == job_id, Job.worker == worker, Job.attempts == attempt,
                                 Job.state == "running")

    def renew_lease(self, job_id: int, worker: str, attempt: int, *, lease_s: float, now: datetime) -> bool:
        """Extend the lease; False when the worker no longer owns the job (it must stop)."""
        stmt = self._fenced(job_id, worker, attempt).values(lease_until=now + timedelta(seconds=lease_s),
                                                            heartbeat_at=now)
        with self._tx() as s:
            return s.execute(stmt).rowcount == 1

    def set_job_progress(self, job_id: int, worker: str, attempt: int, *, stage: str, progress: float,
                         now: datetime) -> tuple[bool, bool]:
        """Record progress; (still owned, cancel requested)."""
        stmt = self._fenced(job_id, worker, attempt).values(stage=stage[:64], progress=min(max(progress, 0.0), 1.0))
        with self._tx() as s:
            owned = s.execute(stmt).rowcount == 1
            cancel = bool(s.scalar(select(Job.cancel_requested).where(Job.id == job_id)))
        return owned, cancel

    def finish_job(self, job_id: int, worker: str, attempt: int, *, state: str, result: dict[str, Any] | None,
                   error: str | None, now: datetime) -> bool:
        """End a job the worker owns (succeeded, failed or cancelled); False when it was no longer owned."""
        values: dict[str, Any] = dict(state=state, result=result, error=error, finished_at=now, lease_until=None)
        if state == "succeeded":
            values.update(progress=1.0, stage="done")
        line = {"succeeded": "succeeded", "cancelled": "cancelled"}.get(state, f"failed: {error}")
        with self._tx() as s:
            if s.execute(self._fenced(job_id, worker, attempt).values(**values)).rowcount != 1:
                return False
            s.add(JobLogLine(job_id=job_id, at=now, attempt=attempt, line=line[:MAX_LOG_LINE_CHARS]))
        return True

    def release_job(self, job_id: int, worker: str, attempt: int, *, now: datetime) -> bool:
        """Give a running job back to the queue (its worker is shutting down); the attempt is not counted."""
        stmt = self._fenced(job_id, worker, attempt).values(state="queued", worker=None, lease_until=None,
                                                            attempts=attempt - 1, stage="queued", progress=0.0)
        with self._tx() as s:
            if s.execute(stmt).rowcount != 1:
                return False
            s.add(JobLogLine(job_id=job_id, at=now, attempt=attempt,
                             line=f"released by {worker} (shutting down); back in the queue"))
        return True

    def request_cancel(self, job_id: int, now: datetime) -> Job | None:
        """A queued job is cancelled at once; a running one is flagged and stops at its next progress report.
        A finished job is returned unchanged. None: no such job."""
        with self._tx() as s:
            row = s.get(Job, job_id, with_for_update=True)
            if row is None:
                return None
            if row.state == "queued":
                self._close(s, row, "cancelled", None, "cancelled before it started", now)
            elif row.state == "running" and not row.cancel_requested:
                row.cancel_requested = True
                s.add(JobLogLine(job_id=row.id, at=now, attempt=row.attempts,
                                 line="cancel requested; the job stops at its next progress report"))
            return row

    def append_job_log(self, job_id: int, attempt: int, line: str, now: datetime) -> None:
        with self._tx() as s:
            s.add(JobLogLine(job_id=job_id, at=now, attempt=attempt, line=line[:MAX_LOG_LINE_CHARS]))

    def get_job(self, job_id: int) -> Job | None:
        with self._tx() as s:
            return s.get(Job, job_id)

    def list_jobs(self, *, state: str | None = None, limit: int = 100) -> list[Job]:
        query = select(Job).order_by(Job.id.desc()).limit(limit)
        if state is not None:
            query = query.where(Job.state == state)
        with self._tx() as s:
            return list(s.scalars(query))

    def job_log(self, job_id: int, since: int = 0, limit: int = MAX_LOG_PAGE) -> list[JobLogLine]:
        """Lines `since` onwards (an offset in lines: a reader passes back how many it has)."""
        query = (select(JobLogLine).where(JobLogLine.job_id == job_id).order_by(JobLogLine.id)
                 .offset(max(since, 0)).limit(min(limit, MAX_LOG_PAGE)))
        with self._tx() as s:
            return list(s.scalars(query))

    def count_jobs(self) -> dict[str, int]:
        with self._tx() as s:
            return {state: int(n) for state, n in s.execute(select(Job.state, func.count()).group_by(Job.state))}

    # ------------------------------------------------------------------------------------------------ calibrations

    def put_calibration(self, device_class: str, calibration: dict[str, Any], now: datetime) -> None:
        stmt = self._insert(ClassCalibration).values(device_class=device_class, calibration=calibration,
                                                     updated_at=now)
        stmt = stmt.on_conflict_do_update(index_elements=[ClassCalibration.device_class],
                                          set_={"calibration": calibration, "updated_at": now})
        with self._tx() as s:
            s.execute(stmt)

    def calibrations(self) -> dict[str, dict[str, Any]]:
        with self._tx() as s:
            return {r.device_class: r.calibration for r in s.scalars(select(ClassCalibration))}

