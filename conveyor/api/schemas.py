"""Request and response bodies of the HTTP API, apart from the tables."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from conveyor.jobs.anomalies import Episode, Signal
from conveyor.jobs.models import Job, JobEvent
from conveyor.jobs.states import JobState, Priority
from conveyor.jobs.store.workflows import Workflow
from conveyor.tasks.json_values import require_storable

Tag = Field(min_length=1, max_length=64)


class StorableBody(BaseModel):
    """A request body refused (422, naming the place) if the store could not keep it as sent."""

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        # Before any field is read: Python's json has already turned 1e999 into infinity,
        # which the store would write as null.
        require_storable(data, cls.__name__)
        return data


class JobIn(StorableBody):
    """A job to submit."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"task": "demo.echo", "payload": {"hello": "world"}}]},
    )

    task: str = Field(
        min_length=1, max_length=200, description="A registered task type", examples=["demo.echo"]
    )
    payload: Any = Field(
        default_factory=dict,
        description="Checked against the task's schema",
        examples=[{"hello": "world"}],
    )
    priority: Priority | None = Field(None, description="Defaults to the task type's")
    delay_seconds: float | None = Field(None, ge=0, le=366 * 86400)
    run_at: AwareDatetime | None = Field(None, description="When to run; with a time zone")
    max_attempts: int | None = Field(None, ge=1, le=100)
    timeout_seconds: float | None = Field(None, gt=0, le=86400)
    tags: list[Annotated[str, Tag]] = Field(default_factory=list, max_length=20)

    @model_validator(mode="after")
    def _one_delay(self) -> JobIn:
        if self.delay_seconds is not None and self.run_at is not None:
            raise ValueError("give delay_seconds or run_at, not both")
        for tag in self.tags:
            if not 1 <= len(tag) <= 64:
                raise ValueError("each tag must be 1 to 64 characters")
        return self


class BatchIn(BaseModel):
    """Up to 1,000 jobs submitted together."""

    model_config = ConfigDict(extra="forbid")
    jobs: list[JobIn] = Field(min_length=1, max_length=1000)


class StepIn(StorableBody):
    """One step of a workflow: a job that runs after the steps it names."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    task: str = Field(min_length=1, max_length=200)
    payload: Any = Field(default_factory=dict)
    after: list[str] = Field(default_factory=list, max_length=1000)
    run_if: Literal["succeeded", "finished"] = "succeeded"
    priority: Priority | None = None
    max_attempts: int | None = Field(None, ge=1, le=100)
    timeout_seconds: float | None = Field(None, gt=0, le=86400)
    tags: list[Annotated[str, Tag]] = Field(default_factory=list, max_length=20)

    @property
    def priority_name(self) -> str | None:
        """The priority the step names, if any."""
        return self.priority.value if self.priority else None


class WorkflowIn(StorableBody):
    """A workflow to submit: 1 to 1,000 steps."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "etl",
                    "steps": [
                        {"key": "fetch", "task": "demo.echo", "payload": {"n": 1}},
                        {"key": "load", "task": "demo.collect", "after": ["fetch"]},
                    ],
                }
            ]
        },
    )

    name: str | None = Field(None, min_length=1, max_length=200)
    steps: list[StepIn] = Field(min_length=1, max_length=1000)
    tags: list[Annotated[str, Tag]] = Field(default_factory=list, max_length=20)


class StepOut(BaseModel):
    """A step as the API shows it within its workflow."""

    key: str
    job_id: uuid.UUID
    task: str
    state: JobState
    after: list[str]
    attempts: int


class WorkflowOut(BaseModel):
    """A workflow and its steps."""

    id: uuid.UUID
    name: str | None
    state: Literal["running", "succeeded", "failed", "cancelled"]
    tags: list[str]
    created_at: dt.datetime
    finished_at: dt.datetime | None
    steps: list[StepOut]

    @classmethod
    def of(cls, workflow: Workflow) -> WorkflowOut:
        """The public view of a stored workflow (with its steps, when read with them)."""
        return cls(
            id=workflow.id,
            name=workflow.name,
            state=workflow.state,
            tags=workflow.tags,
            created_at=workflow.created_at,
            finished_at=workflow.finished_at,
            steps=[
                StepOut(
                    key=s.key,
                    job_id=s.job_id,
                    task=s.task,
                    state=s.state,
                    after=s.after,
                    attempts=s.attempts,
                )
                for s in workflow.steps
            ],
        )


class WorkflowPage(BaseModel):
    """A page of workflows (without their steps), newest first."""

    items: list[WorkflowOut]
    next_cursor: str | None


class ErrorOut(BaseModel):
    """The last error of a job."""

    type: str
    message: str
    traceback: str | None = None


class JobOut(BaseModel):
    """A job as the API shows it."""

    id: uuid.UUID
    task: str
    state: JobState
    priority: Priority
    queue: str
    payload: Any
    result: Any = None
    error: ErrorOut | None = None
    attempts: int
    max_attempts: int
    timeout_seconds: float
    progress: Any = None
    tags: list[str]
    idempotency_key: str | None = None
    created_at: dt.datetime
    scheduled_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    workflow_id: uuid.UUID | None = None
    step: str | None = None

    @classmethod
    def of(cls, job: Job) -> JobOut:
        """The public view of a stored job."""
        error = job.error
        return cls(
            id=job.id,
            task=job.task,
            state=job.state,
            priority=Priority(job.priority),
            queue=job.queue,
            payload=job.payload,
            result=job.result,
            error=None
            if error is None
            else ErrorOut(type=error.type, message=error.message, traceback=error.traceback),
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            timeout_seconds=job.timeout_seconds,
            progress=job.progress,
            tags=job.tags,
            idempotency_key=job.idempotency_key,
            created_at=job.created_at,
            scheduled_at=job.scheduled_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            workflow_id=job.workflow_id,
            step=job.step,
        )


class BatchOut(BaseModel):
    """The jobs of a batch, in the order submitted."""

    jobs: list[JobOut]


class JobPage(BaseModel):
    """A page of jobs, newest first; `next_cursor` fetches the next, null at the end."""

    items: list[JobOut]
    next_cursor: str | None


class EventOut(BaseModel):
    """One step of a job's history."""

    at: dt.datetime
    event: str
    from_state: JobState | None
    to_state: JobState
    attempt: int
    worker: str | None
    detail: Any = None

    @classmethod
    def of(cls, event: JobEvent) -> EventOut:
        """The public view of a stored event."""
        return cls(
            at=event.at,
            event=event.event,
            from_state=None if event.from_state is None else JobState(event.from_state),
            to_state=JobState(event.to_state),
            attempt=event.attempt,
            worker=event.worker,
            detail=event.detail,
        )


class EventsOut(BaseModel):
    """A job's history, oldest first."""

    job_id: uuid.UUID
    items: list[EventOut]


class TaskTypeOut(BaseModel):
    """A registered task type and its defaults."""

    name: str
    description: str
    priority: Priority
    max_attempts: int
    timeout_seconds: float
    payload_schema: dict[str, Any]


class TaskTypesOut(BaseModel):
    """Every registered task type."""

    items: list[TaskTypeOut]


class AnomalyOut(BaseModel):
    """A task type's signal out of its own recent baseline, for as long as it stays out."""

    task: str
    signal: Signal = Field(
        description="failure_rate (dead over succeeded and dead), run_p95 or wait_p95 (seconds)"
    )
    value: float = Field(description="The signal over the latest window")
    baseline: float = Field(description="The median of the signal over the recent baseline")
    score: float = Field(description="Robust z-score of the value against the baseline")
    started_at: dt.datetime
    last_seen_at: dt.datetime

    @classmethod
    def of(cls, episode: Episode) -> AnomalyOut:
        """The public view of an open episode."""
        return cls(
            task=episode.task,
            signal=episode.signal,
            value=round(episode.value, 6),
            baseline=round(episode.baseline, 6),
            score=round(episode.score, 2),
            started_at=episode.started_at,
            last_seen_at=episode.last_seen_at,
        )


class AnomaliesOut(BaseModel):
    """The tenant's task types out of their baseline now, by task type and signal."""

    items: list[AnomalyOut]


class ProblemOut(BaseModel):
    """An RFC 9457 problem."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = None
