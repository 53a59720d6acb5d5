"""What the client's calls return: jobs, dead letters, and the errors they raise."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

TERMINAL = frozenset({"succeeded", "dead", "cancelled"})


def _time(value: str | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass(frozen=True)
class JobError:
    """What went wrong in a job's last failed attempt."""

    type: str
    message: str
    traceback: str | None = None


@dataclass(frozen=True)
class Job:
    """A job as the API shows it."""

    id: uuid.UUID
    task: str
    state: str
    priority: str
    queue: str
    payload: Any
    result: Any
    error: JobError | None
    attempts: int
    max_attempts: int
    timeout_seconds: float
    progress: Any
    tags: list[str]
    idempotency_key: str | None
    created_at: dt.datetime
    scheduled_at: dt.datetime | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None

    @property
    def finished(self) -> bool:
        """Whether the job is in a terminal state (succeeded, dead or cancelled)."""
        return self.state in TERMINAL

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Job:
        """The job of an API answer."""
        error = data.get("error")
        created = _time(data["created_at"])
        assert created is not None
        return cls(
            id=uuid.UUID(data["id"]),
            task=data["task"],
            state=data["state"],
            priority=data["priority"],
            queue=data["queue"],
            payload=data.get("payload"),
            result=data.get("result"),
            error=None if error is None else JobError(**error),
            attempts=data["attempts"],
            max_attempts=data["max_attempts"],
            timeout_seconds=data["timeout_seconds"],
            progress=data.get("progress"),
            tags=list(data.get("tags") or []),
            idempotency_key=data.get("idempotency_key"),
            created_at=created,
            scheduled_at=_time(data.get("scheduled_at")),
            started_at=_time(data.get("started_at")),
            finished_at=_time(data.get("finished_at")),
        )


@dataclass(frozen=True)
class DeadGroup:
    """Dead jobs sharing a task, an error type and an error fingerprint."""

    task: str
    error_type: str
    fingerprint: str
    count: int


@dataclass(frozen=True)
class DeadLetters:
    """Dead jobs, most recent first, and their groups."""

    items: list[Job]
    groups: list[DeadGroup]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeadLetters:
        """The dead letters of an API answer."""
        return cls(
            items=[Job.from_json(item) for item in data["items"]],
            groups=[DeadGroup(**group) for group in data["groups"]],
        )


class ConveyorError(Exception):
    """An answer other than a success, with the problem the API described (RFC 9457)."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        type: str = "about:blank",
        errors: list[dict[str, Any]] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.type = type
        self.title = title
        self.detail = detail
        self.errors = errors or []
        self.retry_after = retry_after

    @classmethod
    def from_response(cls, response: httpx.Response) -> ConveyorError:
        """The error of a refused request; a body that is no problem is still reported."""
        try:
            body = response.json()
        except ValueError:
            body = None
        retry = response.headers.get("Retry-After")
        retry_after = float(retry) if retry and retry.replace(".", "", 1).isdigit() else None
        if not isinstance(body, dict):
            text = response.text.strip()[:500] or response.reason_phrase
            return cls(response.status_code, response.reason_phrase, text, retry_after=retry_after)
        return cls(
            int(body.get("status", response.status_code)),
            str(body.get("title", response.reason_phrase)),
            str(body.get("detail", "")),
            type=str(body.get("type", "about:blank")),
            errors=body.get("errors"),
            retry_after=retry_after,
        )


class WaitTimeout(TimeoutError):
    """The job (or workflow) had not finished when the wait ran out; `job` is how it was
    last seen."""

    def __init__(self, job: Any, seconds: float) -> None:
        kind = "job" if isinstance(job, Job) else "workflow"
        super().__init__(f"{kind} {job.id} is still {job.state} after {seconds:g} s")
        self.job = job
