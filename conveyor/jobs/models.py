"""Plain values passed in and out of the store: a new job, a job, an event, an error."""

from __future__ import annotations

import datetime as dt
import functools
import uuid
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from conveyor import ids
from conveyor.jobs.states import JobState

if TYPE_CHECKING:
    from sqlalchemy import RowMapping


def utcnow() -> dt.datetime:
    """The current time, timezone-aware UTC."""
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class NewJob:
    """Everything needed to record a job; the API and the CLI build these."""

    tenant: str
    task: str
    payload: Any
    priority: str
    queue: str
    max_attempts: int
    timeout_seconds: float
    tags: list[str] = field(default_factory=list)
    idempotency_key: str | None = None
    request_hash: str | None = None
    run_at: dt.datetime | None = None
    id: uuid.UUID = field(default_factory=ids.uuid4)
    schedule_id: uuid.UUID | None = None
    schedule_tick: dt.datetime | None = None
    traceparent: str | None = None
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class NewStep:
    """A step to record: its key, its job, the keys it runs after and on what outcome."""

    key: str
    job: NewJob
    after: tuple[str, ...] = ()
    run_if: str = "succeeded"


@dataclass(frozen=True, slots=True)
class JobError:
    """What went wrong in an attempt."""

    type: str
    message: str
    traceback: str | None = None
    fingerprint: str | None = None


@dataclass(frozen=True, slots=True)
class Job:
    """One row of the jobs table."""

    id: uuid.UUID
    tenant: str
    task: str
    state: JobState
    priority: str
    queue: str
    payload: Any
    result: Any
    error_type: str | None
    error_message: str | None
    error_traceback: str | None
    error_fingerprint: str | None
    attempts: int
    max_attempts: int
    timeout_seconds: float
    progress: Any
    tags: list[str]
    idempotency_key: str | None
    request_hash: str | None
    worker: str | None
    lease_expires_at: dt.datetime | None
    cancel_requested: bool
    created_at: dt.datetime
    scheduled_at: dt.datetime | None
    run_after: dt.datetime | None
    published_at: dt.datetime | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    updated_at: dt.datetime
    limit_key: str | None = None
    slot_at: dt.datetime | None = None
    traceparent: str | None = None
    request_id: str | None = None
    lease_token: int = 0
    workflow_id: uuid.UUID | None = None
    step: str | None = None
    run_if: str | None = None
    parents_left: int = 0
    parents_failed: int = 0

    @classmethod
    def from_row(cls, row: RowMapping) -> Job:
        """Build from a row of the jobs table."""
        names = _job_fields()
        values = {name: value for name, value in row.items() if name in names}
        values["state"] = JobState(values["state"])
        return cls(**values)

    @property
    def error(self) -> JobError | None:
        """The last error, if any attempt failed."""
        if self.error_type is None:
            return None
        return JobError(
            self.error_type,
            self.error_message or "",
            self.error_traceback,
            self.error_fingerprint,
        )


@functools.cache
def _job_fields() -> frozenset[str]:
    return frozenset(f.name for f in fields(Job))


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One recorded step in a job's history."""

    id: int
    job_id: uuid.UUID
    at: dt.datetime
    event: str
    from_state: str | None
    to_state: str
    attempt: int
    worker: str | None
    detail: Any

    @classmethod
    def from_row(cls, row: RowMapping) -> JobEvent:
        """Build from a row of the job_events table."""
        return cls(**{f.name: row[f.name] for f in fields(cls)})
