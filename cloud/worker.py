"""`Worker`: the loop of `edgefleet-cloud worker`, which runs queued jobs (distillations) away from the API server.

Theory: a worker claims one job at a time from the database (`Store.claim_job`: queued jobs, or running jobs whose
lease ran out because their worker died), runs the job's handler in its own thread, and meanwhile a heartbeat
thread renews the lease every third of `job_lease_s`. Any number of workers on any number of machines may share a
database; the claim is what keeps two of them off the same job. A worker killed mid-job (SIGKILL, OOM, power) simply
stops renewing: once the lease runs out another worker claims the job again (attempts + 1) and runs it from the
start, until `job_max_attempts` is reached and the claim fails it instead.

The handler reports through a `JobContext`: `progress(stage, fraction)` and `log(line)` go to the job's row and
log (readable while it runs), and `should_cancel()` turns true once someone cancelled the job, the lease was lost
to another worker, or this worker is shutting down. `progress` also raises `JobStopped` at that point, so a
handler stops at its next progress report even where it never asks. `JobStopped` is a BaseException, like
asyncio's CancelledError, so that a handler's `except Exception` around one step cannot swallow it.

Outcomes: the handler's return value is the job's result (succeeded); a `CloudError` (bad input, a drifted
artifact) fails the job with its message; any other exception fails it with its type and message, the trace going
to the worker's log. A cancelled job ends "cancelled"; a job lost to another worker is left alone; on SIGTERM the
current job is released back to the queue so that a restart does not wait out the lease.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from edgefleet.cloud.errors import CloudError

if TYPE_CHECKING:
    from edgefleet.cloud.db.models import Job
    from edgefleet.cloud.services import Fleet

log = logging.getLogger("edgefleet.cloud.worker")

Handler = Callable[["Fleet", "JobContext"], dict[str, Any]]
# Handlers by job kind, as "module:function" so that a worker imports torch only when it runs a distillation.
KINDS: dict[str, str | Handler] = {"distill": "edgefleet.cloud.services_distill:run_distill_job"}
# 0.25 s: progress reaches the database (and a cancel reaches the job) at most this late; callbacks in between
# cost nothing, so a training loop may report every batch.
PROGRESS_WRITE_S = 0.25


def register_kind(kind: str, handler: str | Handler) -> None:
    """Add a job kind (tests and plugins); a worker runs only the kinds known when it starts."""
    KINDS[kind] = handler


def _handler(kind: str) -> Handler:
    target = KINDS[kind]
    if isinstance(target, str):
        module, _, name = target.partition(":")
        target = getattr(importlib.import_module(module), name)
    return target


class JobStopped(BaseException):
    """Raised by `JobContext.progress` once the job must stop: reason "cancel", "lost" or "shutdown"."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _now() -> datetime:
    return datetime.now(timezone.utc)


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class JobContext:
    """What a handler sees of its job: the row as claimed, progress, log, and whether to stop."""

    def __init__(self, fleet: Fleet, job: Job, worker_id: str, shutdown: threading.Event) -> None:
        self.fleet = fleet
        self.job = job
        self.attempt = job.attempts
        self.worker_id = worker_id
        self._shutdown = shutdown
        self._cancel = False
        self.lost = False  # set by the heartbeat when another worker owns the job now
        self._stage = ""
        self._fraction = 0.0
        self._written = 0.0  # monotonic time of the last progress write

    @property
    def stop_reason(self) -> str | None:
        if self.lost:
            return "lost"
        if self._cancel:
            return "cancel"
        if self._shutdown.is_set():
            return "shutdown"
        return None

    def _write(self) -> None:
        owned, cancel = self.fleet.store.set_job_progress(self.job.id, self.worker_id, self.attempt,
                                                          stage=self._stage, progress=self._fraction, now=_now())
        self._written = time.monotonic()
        self.lost = self.lost or not owned
        self._cancel = self._cancel or cancel

    def progress(self, stage: str, fraction: float) -> None:
        """Report the current stage and the fraction (0..1) of the whole job done; raises JobStopped to stop."""
        new_stage = stage != self._stage
        self._stage, self._fraction = stage, float(fraction)
        if new_stage or time.monotonic() - self._written >= PROGRESS_WRITE_S:
            self._write()
            if new_stage:
                self.log(f"{stage} ({self._fraction:.0%})")
        if (reason := self.stop_reason) is not None:
            raise JobStopped(reason)

    def should_cancel(self) -> bool:
        if self.stop_reason is None and time.monotonic() - self._written >= PROGRESS_WRITE_S:
            self._write()
        return self.stop_reason is not None

    def log(self, line: str) -> None:
        if not self.lost:
            self.fleet.store.append_job_log(self.job.id, self.attempt, line, _now())


class _JobLogHandler(logging.Handler):
    """Copies records of edgefleet.cloud.distill logged by the job's own thread into the job's log."""

    def __init__(self, ctx: JobContext) -> None:
        super().__init__(logging.INFO)
        self.ctx = ctx
        self.thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.thread:
            return
        try:
            self.ctx.log(record.getMessage())
        except Exception:  # noqa: BLE001 - a log line must never fail the job
            pass


@dataclass(frozen=True)
class WorkerConfig:
    worker_id: str
    lease_s: float
    poll_s: float
    kinds: tuple[str, ...]


class Worker:
    def __init__(self, fleet: Fleet, config: WorkerConfig) -> None:
        self.fleet = fleet
        self.config = config
        self.stopping = threading.Event()

    @classmethod
    def from_fleet(cls, fleet: Fleet, worker_id: str | None = None,
                   kinds: tuple[str, ...] | None = None) -> Worker:
        s = fleet.settings
        return cls(fleet, WorkerConfig(worker_id=worker_id or default_worker_id(), lease_s=s.job_lease_s,
                                       poll_s=s.worker_poll_s, kinds=kinds or tuple(sorted(KINDS))))

    def run_once(self) -> bool:
        """Claim and run one job; False when there was none."""
        c = self.config
        job = self.fleet.store.claim_job(c.worker_id, kinds=list(c.kinds), lease_s=c.lease_s, now=_now())
        if job is None:
            return False
        log.info("job %d (%s): attempt %d/%d", job.id, job.kind, job.attempts, job.max_attempts)
        self._run(job)
        return True

    def run_forever(self, *, once: bool = False) -> None:
        """Claim and run jobs until `stopping` is set (SIGTERM) or, with `once`, until the queue is empty."""
        while not self.stopping.is_set():
            try:
                ran = self.run_once()
            except CloudError as exc:  # the database is down or busy: wait and claim again
                log.warning("claiming a job failed: %s", exc.message)
                ran = False
            if once and not ran:
                return
            if not ran:
                self.stopping.wait(self.config.poll_s)

    def _heartbeat(self, ctx: JobContext, done: threading.Event) -> None:
        # A third of the lease: two renewals may fail (a database hiccup) before another worker may claim the job.
        interval = self.config.lease_s / 3
        while not done.wait(interval):
            try:
                if not self.fleet.store.renew_lease(ctx.job.id, self.config.worker_id, ctx.attempt,
                                                    lease_s=self.config.lease_s, now=_now()):
                    log.warning("job %d: lease lost to another worker; stopping it here", ctx.job.id)
                    ctx.lost = True
                    return
            except CloudError as exc:
                log.warning("job %d: renewing the lease failed (%s); retrying", ctx.job.id, exc.message)

    def _run(self, job: Job) -> None:
        ctx = JobContext(self.fleet, job, self.config.worker_id, self.stopping)
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(ctx, done), name=f"job-{job.id}-lease", daemon=True)
        beat.start()
        capture = _JobLogHandler(ctx)
        core_log = logging.getLogger("edgefleet.cloud.distill")
        if core_log.getEffectiveLevel() > logging.INFO:  # the core's INFO lines belong in the job log
            core_log.setLevel(logging.INFO)
        core_log.addHandler(capture)
        state, result, error = "failed", None, None
        try:
            result = _handler(job.kind)(self.fleet, ctx)
            state = "succeeded"
            if ctx.stop_reason is not None:  # the handler returned after a stop without acting on it
                raise JobStopped(ctx.stop_reason)
        except JobStopped as stop:
            state = stop.reason
        except CloudError as exc:
            error = exc.message
        except Exception as exc:
            log.exception("job %d failed", job.id)
            error = f"{type(exc).__name__}: {exc}"
        finally:
            core_log.removeHandler(capture)
            done.set()
            beat.join()
        if state != "succeeded" and ctx.stop_reason is not None:
            # A handler that turned the stop into its own exception (the core's DistillCancelled): a stop, not an
            # error of the job.
            state, error = ctx.stop_reason, None
        self._settle(ctx, state, result, error)

    def _settle(self, ctx: JobContext, state: str, result: dict[str, Any] | None, error: str | None) -> None:
        store, c, job = self.fleet.store, self.config, ctx.job
        if state == "lost":
            return  # another worker owns it now; anything written here would be fenced off anyway
        if state == "shutdown":
            released = store.release_job(job.id, c.worker_id, ctx.attempt, now=_now())
            log.info("job %d: %s", job.id, "released to the queue" if released else "no longer ours")
            return
        if state == "cancel":
            state = "cancelled"
        if not store.finish_job(job.id, c.worker_id, ctx.attempt, state=state, result=result, error=error,
                                now=_now()):
            log.warning("job %d: finished as %s, but another worker owns it now; result dropped", job.id, state)
        else:
            log.info("job %d: %s%s", job.id, state, f": {error}" if error else "")


def import_plugins(modules: list[str]) -> None:
    """Import modules that call `register_kind` (test-only kinds, site extensions)."""
    for name in modules:
        importlib.import_module(name)


__all__ = ["KINDS", "JobContext", "JobStopped", "Worker", "WorkerConfig", "import_plugins", "register_kind"]
