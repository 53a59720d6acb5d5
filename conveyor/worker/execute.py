"""The execution path around every job: claim, run the handler, record the outcome."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import threading
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from conveyor.jobs import store
from conveyor.jobs.models import Job, JobError
from conveyor.jobs.states import JobState
from conveyor.jobs.tables import jobs as jobs_table
from conveyor.tasks.registry import PermanentError, Registry, UnknownTask
from conveyor.worker.backoff import retry_delay
from conveyor.worker.leases import JobCancelled, LeaseKeeper

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """The TaskContext handed to handlers: job identity, cancellation, progress."""

    job: Job
    sessions: sessionmaker[Session]
    lost: threading.Event = field(default_factory=threading.Event)

    @property
    def job_id(self) -> str:
        """The job id, as a string."""
        return str(self.job.id)

    @property
    def attempt(self) -> int:
        """This attempt's number, from 1."""
        return self.job.attempts

    def cancelled(self) -> bool:
        """Whether the job was taken from this run (cancelled, or rescued elsewhere)."""
        return self.lost.is_set()

    def set_progress(self, progress: Any) -> None:
        """Store progress on the job row while this attempt holds it."""
        with self.sessions.begin() as session:
            session.execute(
                update(jobs_table)
                .where(
                    jobs_table.c.id == self.job.id,
                    jobs_table.c.state == JobState.RUNNING.value,
                    jobs_table.c.worker == self.job.worker,
                )
                .values(progress=progress)
            )


def describe_error(error: BaseException) -> JobError:
    """Type, message, traceback and a fingerprint that groups errors of one kind and place."""
    kind = f"{type(error).__module__}.{type(error).__qualname__}".removeprefix("builtins.")
    frames = traceback.extract_tb(error.__traceback__)
    where = "|".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.name}" for f in frames[-3:])
    fingerprint = hashlib.sha256(f"{kind}|{where}".encode()).hexdigest()[:16]
    text = "".join(traceback.format_exception(error))
    return JobError(kind, str(error)[:4000], text[-16000:], fingerprint)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one delivery, for logs, metrics and tests."""

    job_id: uuid.UUID
    action: str  # ran-succeeded | ran-retrying | ran-dead | ran-lost | dropped
    state: JobState | None
    retry_in: float | None = None


Reschedule = Callable[[Job], None]


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
    ) -> None:
        self._sessions = sessions
        self._registry = registry
        self._worker = worker
        self._lease_seconds = lease_seconds
        self._reschedule = reschedule
        self.leases = leases

    def run(self, job_id: uuid.UUID) -> Outcome:
        """Claim the job, run its handler, record the outcome; drop what it cannot claim."""
        sessions = self._sessions()
        worker = self._worker()
        job = self._claim(sessions, job_id, worker)
        if isinstance(job, Outcome):
            return job
        lost = self.leases.hold(job.id, job.attempts, job.timeout_seconds)
        try:
            task_type = self._registry.get(job.task)
            payload = task_type.validate(job.payload)
            result = task_type.handler(payload, RunContext(job, sessions, lost))
        except JobCancelled:
            return Outcome(job.id, "ran-lost", self._state(sessions, job.id))
        except Exception as error:
            if lost.is_set():
                return Outcome(job.id, "ran-lost", self._state(sessions, job.id))
            return self._failed(sessions, job, worker, error)
        finally:
            self.leases.drop(job.id)
        with sessions.begin() as session:
            done = store.succeed(
                session, job.id, worker=worker, attempt=job.attempts, result=result
            )
        if done is None:
            return Outcome(job.id, "ran-lost", self._state(sessions, job.id))
        return Outcome(job.id, "ran-succeeded", JobState.SUCCEEDED)

    def _claim(
        self, sessions: sessionmaker[Session], job_id: uuid.UUID, worker: str
    ) -> Job | Outcome:
        with sessions.begin() as session:
            job = store.claim(session, job_id, worker=worker, lease_seconds=self._lease_seconds)
            if job is not None:
                return job
            current = store.get_job(session, job_id)
            if current is None:
                return Outcome(job_id, "dropped", None)
            expired = (
                current.state == JobState.RUNNING
                and current.lease_expires_at is not None
                and current.lease_expires_at < store.utcnow()
            )
            if expired and (rescued := store.rescue(session, job_id)) is not None:
                # Its last worker is gone; this delivery takes over at once.
                current = rescued
                job = store.claim(session, job_id, worker=worker, lease_seconds=self._lease_seconds)
                if job is not None:
                    return job
            waiting = current.state in (JobState.SCHEDULED, JobState.RETRYING)
            if waiting and store.promote(session, job_id) is not None:
                job = store.claim(session, job_id, worker=worker, lease_seconds=self._lease_seconds)
                if job is not None:
                    return job
            if current.state == JobState.QUEUED and current.attempts >= current.max_attempts:
                # A message that keeps killing its worker ends here, counted in the store.
                return self._exhausted(session, current, worker)
            store.record_dropped_delivery(
                session, current, worker=worker, reason=f"job is {current.state.value}"
            )
            return Outcome(job_id, "dropped", current.state)

    @staticmethod
    def _exhausted(session: Session, job: Job, worker: str) -> Outcome:
        error = JobError("AttemptsExhausted", "delivered with no attempts left", None, None)
        store.exhaust(session, job.id, worker=worker, error=error)
        return Outcome(job.id, "ran-dead", JobState.DEAD)

    def _failed(
        self, sessions: sessionmaker[Session], job: Job, worker: str, error: BaseException
    ) -> Outcome:
        described = describe_error(error)
        permanent = isinstance(error, PermanentError | UnknownTask | ValidationError)
        task_type = self._registry.get(job.task) if job.task in self._registry else None
        if not permanent and job.attempts < job.max_attempts and task_type is not None:
            delay = retry_delay(
                job.attempts, base=task_type.retry_base_seconds, cap=task_type.retry_cap_seconds
            )
            now = store.utcnow()
            with sessions.begin() as session:
                waiting = store.fail_retry(
                    session,
                    job.id,
                    worker=worker,
                    attempt=job.attempts,
                    error=described,
                    run_after=now + dt.timedelta(seconds=delay),
                    now=now,
                )
            if waiting is None:
                return Outcome(job.id, "ran-lost", self._state(sessions, job.id))
            # A retry the broker did not take is published by the relay when due.
            self._reschedule(waiting)
            return Outcome(job.id, "ran-retrying", JobState.RETRYING, delay)
        with sessions.begin() as session:
            gone = store.dead(session, job.id, worker=worker, attempt=job.attempts, error=described)
        if gone is None:
            return Outcome(job.id, "ran-lost", self._state(sessions, job.id))
        return Outcome(job.id, "ran-dead", JobState.DEAD)

    @staticmethod
    def _state(sessions: sessionmaker[Session], job_id: uuid.UUID) -> JobState | None:
        with sessions() as session:
            job = store.get_job(session, job_id)
        return None if job is None else job.state
