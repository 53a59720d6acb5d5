"""What a run sees and what it reports: the handler's context, outcomes, error records."""

from __future__ import annotations

import hashlib
import threading
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from conveyor import lazy
from conveyor.jobs.models import Job, JobError
from conveyor.jobs.states import JobState
from conveyor.observability import logs, tracing

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from conveyor.jobs.fastpath import FastPath

log = logs.get(__name__)


@dataclass
class RunContext:
    """The TaskContext handed to handlers: job identity, cancellation, progress."""

    job: Job
    sessions: Callable[[], sessionmaker[Session]]  # this process's, made on first use
    lost: threading.Event = field(default_factory=threading.Event)
    fast_path: FastPath | None = None  # on PostgreSQL: progress without a session
    _parents: dict[str, Any] | None = field(default=None, repr=False)

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

    @property
    def parent_results(self) -> dict[str, Any]:
        """For a workflow step: the results of its parents that succeeded, by their keys
        (read once, when first asked); {} for a job outside a workflow."""
        if self.job.workflow_id is None:
            return {}
        if self._parents is None:
            if self.fast_path is not None:
                self._parents = self.fast_path.parent_results(self.job.id)
            else:
                from conveyor.jobs.store import workflows

                with self.sessions()() as session:
                    self._parents = workflows.parent_results(session, self.job.id)
        return dict(self._parents)

    def set_progress(self, progress: Any) -> None:
        """Store progress on the job row while this attempt holds it.

        Progress is a report, not an outcome: a database briefly away costs the report
        (the next one writes it), never the attempt.
        """
        try:
            self._write_progress(progress)
        except lazy.transient_db_errors() as error:
            log.warning("could not store the job's progress: %s", error)

    def _write_progress(self, progress: Any) -> None:
        if self.fast_path is not None:
            self.fast_path.set_progress(self.job.id, self.job.lease_token, progress)
            return
        from sqlalchemy import update

        from conveyor.jobs.tables import jobs as jobs_table

        with self.sessions().begin() as session:
            session.execute(
                update(jobs_table)
                .where(
                    jobs_table.c.id == self.job.id,
                    jobs_table.c.state == JobState.RUNNING.value,
                    jobs_table.c.lease_token == self.job.lease_token,
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
    action: str  # ran-succeeded | ran-retrying | ran-dead | ran-lost | dropped | deferred
    state: JobState | None
    retry_in: float | None = None


def job_context(job: Job) -> dict[str, Any]:
    """The fields every log line about `job` carries."""
    return {
        "job_id": str(job.id),
        "task": job.task,
        "attempt": job.attempts,
        "tenant": job.tenant,
        "queue": job.queue,
        "trace_id": tracing.trace_id_of() or tracing.trace_id_in(job.traceparent),
        "request_id": job.request_id,
    }
