"""The execution path around every job: claim, run the handler, record the outcome.

The claim is one statement on the fast path for task types without limits, and goes
through `claiming` for the rest; successes are handed to the process's completer.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError

from conveyor import lazy
from conveyor.config import TaskLimits
from conveyor.jobs.fastpath import FastPath
from conveyor.jobs.models import Job, JobError
from conveyor.jobs.states import TERMINAL_STATES, JobState
from conveyor.observability import logs, metrics
from conveyor.tasks.registry import PermanentError, Registry, UnknownTask
from conveyor.worker.backoff import retry_delay
from conveyor.worker.claiming import Claim, Claimer, ClaimKind
from conveyor.worker.completer import Completer, Success
from conveyor.worker.context import Outcome, RunContext, describe_error, job_context
from conveyor.worker.leases import JobCancelled, LeaseKeeper

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from conveyor.jobs import store
    from conveyor.worker.limiter import Limiter
else:
    # Loaded by the first outcome other than a success on the fast path (conveyor.lazy).
    store = lazy.module("conveyor.jobs.store")

__all__ = [
    "Executor",
    "Outcome",
    "Reschedule",
    "RunContext",
    "describe_error",
    "job_context",
    "observe_start",
]

log = logs.get(__name__)

Reschedule = Callable[[Job], None]
_T = TypeVar("_T")


def observe_start(job: Job) -> None:
    """Count a claimed attempt; its queue wait when it is the job's first."""
    metrics.labelled(metrics.JOBS_STARTED, job.task, job.queue).inc()
    if job.attempts == 1 and job.started_at is not None and job.scheduled_at is not None:
        wait = (job.started_at - job.scheduled_at).total_seconds()
        metrics.labelled(metrics.JOB_QUEUE_WAIT_SECONDS, job.queue).observe(max(0.0, wait))


class Executor:
    """Runs the deliveries of one worker process."""

    def __init__(
        self,
        *,
        sessions: Callable[[], sessionmaker[Session]],
        registry: Registry,
        worker: Callable[[], str],
        lease_seconds: float,
        reschedule: Reschedule,
        leases: LeaseKeeper,
        limits: dict[str, TaskLimits] | None = None,
        limiter: Limiter | None = None,
        fast_path: FastPath | None = None,
        rate_horizon: float = 1.0,
        batch_successes: bool = False,
        finished_steps: Callable[[list[Job]], object] = lambda jobs: None,
    ) -> None:
        self._sessions = sessions
        self._registry = registry
        self._worker = worker
        self._lease_seconds = lease_seconds
        self._reschedule = reschedule
        self.leases = leases
        self._limited = sorted(limits or {})
        self._fast_path = fast_path
        self._finished_steps = finished_steps
        self._claimer = Claimer(
            lease_seconds=lease_seconds,
            limits=limits or {},
            limiter=limiter,
            rate_horizon=rate_horizon,
        )
        self.completer: Completer | None = None
        if batch_successes and fast_path is not None:
            self.completer = Completer(
                fast_path,
                leases,
                lost=self._lost,
                transient=lazy.transient_db_errors,
                finished_steps=finished_steps,
            )

    def run(self, job_id: uuid.UUID) -> Outcome:
        """Claim the job, run its handler, record the outcome; drop what it cannot claim."""
        with logs.bound(job_id=str(job_id)):
            return self._run(job_id)

    def _run(self, job_id: uuid.UUID) -> Outcome:
        # The session factory (and SQLAlchemy with it) is made only when a run needs it.
        worker = self._worker()
        claim = self._claim(job_id, worker)
        if claim.kind is not ClaimKind.CLAIMED:
            outcome = claim.outcome()
            log.debug("delivery not run: %s", outcome.action)
            return outcome
        job = claim.job
        context = job_context(job)
        with logs.bound(**context):
            outcome = self._attempt(job, worker, context)
            # A workflow step's transition released the steps after it: publish them (a
            # success handed to the completer is followed up there, once written).
            handed_over = outcome.action == "ran-succeeded" and self.completer is not None
            if job.workflow_id is not None and outcome.state in TERMINAL_STATES and not handed_over:
                self._finished_steps([job])
            return outcome

    def _claim(self, job_id: uuid.UUID, worker: str) -> Claim:
        """Claim on the fast path when it can; flow control needs a transaction around it."""
        if self._fast_path is not None:
            # Task types with limits are left to the claimer; the rest keep the
            # one-statement claim whatever CONVEYOR_LIMITS holds for others.
            job = self._fast_path.claim(
                job_id, worker=worker, lease_seconds=self._lease_seconds, limited=self._limited
            )
            if job is not None:
                return Claim.claimed(job)
            # The usual duplicate, a finished job's, is dropped here too.
            finished = self._fast_path.drop_finished(job_id, worker=worker)
            if finished is not None:
                return Claim.dropped(job_id, finished)
        return self._claimer.claim(self._sessions(), job_id, worker)

    def _attempt(self, job: Job, worker: str, context: dict[str, Any]) -> Outcome:
        started = time.perf_counter()
        observe_start(job)
        log.debug("job started")
        token = job.lease_token
        lost = self.leases.hold(job.id, token, job.timeout_seconds)
        handed_over = False
        try:
            try:
                task_type = self._registry.get(job.task)
                payload = task_type.validate(job.payload)
                run = RunContext(job, self._sessions, lost, self._fast_path)
                result = task_type.handler(payload, run)
            except Exception as error:
                metrics.labelled(metrics.JOB_RUN_SECONDS, job.task).observe(
                    time.perf_counter() - started
                )
                if lost.is_set():
                    return self._lost(job, worker)
                return self._failed(job, worker, error, lost)
            elapsed = time.perf_counter() - started
            metrics.labelled(metrics.JOB_RUN_SECONDS, job.task).observe(elapsed)
            if self.completer is not None:
                # The lease stays held (and renewed) until the completer has written
                # the success; this thread is free for the next delivery.
                self.leases.detach(job.id, token)
                handed_over = True
                self.completer.add(Success(job, worker, result, elapsed, context))
                return Outcome(job.id, "ran-succeeded", JobState.SUCCEEDED)
            # The lease is still renewed while the outcome is written, so a write that
            # meets a passing database error can be tried again under it.
            held = self._write(lost, lambda: self._succeed(job, worker, result))
        except JobCancelled:
            return self._lost(job, worker)
        finally:
            if not handed_over:
                self.leases.drop(job.id, token)
        if not held:
            log.info("job result not recorded: it was cancelled or taken away")
            return self._lost(job, worker)
        metrics.count_finished(job, JobState.SUCCEEDED.value)
        log.info("job succeeded", run_seconds=round(elapsed, 6))
        return Outcome(job.id, "ran-succeeded", JobState.SUCCEEDED)

    def _succeed(self, job: Job, worker: str, result: Any) -> bool:
        if self._fast_path is not None:
            return self._fast_path.succeed(
                job.id, worker=worker, token=job.lease_token, result=result
            )
        with self._sessions().begin() as session:
            done = store.succeed(
                session, job.id, worker=worker, token=job.lease_token, result=result
            )
        return done is not None

    def _write(self, lost: threading.Event, write: Callable[[], _T]) -> _T:
        """Run an outcome write, trying again through transient database errors.

        It keeps trying while the run holds its lease: once the lease is lost the job
        is someone else's (cancelled or rescued), and the write could only be refused.
        """
        pause = 0.05
        while True:
            try:
                return write()
            except lazy.transient_db_errors() as error:
                if lost.is_set():
                    raise
                log.warning("could not record the outcome, trying again: %s", error)
                lost.wait(pause)
                pause = min(pause * 2, 1.0)

    def _lost(self, job: Job, worker: str) -> Outcome:
        """The run was taken away (cancelled or rescued) and has ended: say so."""
        log.info("job stopped: it was cancelled or taken away")
        sessions = self._sessions()
        try:
            with sessions.begin() as session:
                after = store.stopped(session, job.id, worker=worker, token=job.lease_token)
        except lazy.transient_db_errors() as error:
            # Its stop window ends with the lease; a retry waiting for it then goes ahead.
            log.warning("could not record that the run stopped: %s", error)
        else:
            if after is not None and after.state == JobState.SCHEDULED:
                # A retry was waiting for this run to stop: it goes ahead now.
                self._reschedule(after)
        return Outcome(job.id, "ran-lost", self._state(sessions, job.id))

    def _failed(
        self, job: Job, worker: str, error: BaseException, lost: threading.Event
    ) -> Outcome:
        sessions = self._sessions()
        described = describe_error(error)
        permanent = isinstance(error, PermanentError | UnknownTask | ValidationError)
        task_type = self._registry.get(job.task) if job.task in self._registry else None
        if not permanent and job.attempts < job.max_attempts and task_type is not None:
            delay = retry_delay(
                job.attempts, base=task_type.retry_base_seconds, cap=task_type.retry_cap_seconds
            )
            waiting = self._write(
                lost,
                lambda: self._fail_retry(sessions, job, worker, described, delay),
            )
            if waiting is None:
                return self._lost(job, worker)
            metrics.JOBS_RETRIED.labels(job.task).inc()
            log.warning(
                "job failed; retrying",
                error_type=described.type,
                error=described.message,
                retry_in=round(delay, 3),
            )
            # A retry the broker did not take is published by the relay when due.
            self._reschedule(waiting)
            return Outcome(job.id, "ran-retrying", JobState.RETRYING, delay)
        gone = self._write(lost, lambda: self._dead(sessions, job, worker, described))
        if gone is None:
            return self._lost(job, worker)
        metrics.count_finished(job, JobState.DEAD.value)
        log.error("job dead", error_type=described.type, error=described.message)
        return Outcome(job.id, "ran-dead", JobState.DEAD)

    @staticmethod
    def _fail_retry(
        sessions: sessionmaker[Session], job: Job, worker: str, error: JobError, delay: float
    ) -> Job | None:
        with sessions.begin() as session:
            return store.fail_retry(
                session,
                job.id,
                worker=worker,
                token=job.lease_token,
                error=error,
                delay_seconds=delay,
            )

    @staticmethod
    def _dead(
        sessions: sessionmaker[Session], job: Job, worker: str, error: JobError
    ) -> Job | None:
        with sessions.begin() as session:
            return store.dead(session, job.id, worker=worker, token=job.lease_token, error=error)

    @staticmethod
    def _state(sessions: sessionmaker[Session], job_id: uuid.UUID) -> JobState | None:
        with sessions() as session:
            job = store.get_job(session, job_id)
        return None if job is None else job.state
