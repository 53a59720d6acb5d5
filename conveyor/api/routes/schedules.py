"""/v1/schedules: users' cron and interval schedules, applied by beat within seconds."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.exc import IntegrityError

from conveyor.api.deps import Reader, State, Submitter
from conveyor.api.problems import Problem, validation_errors
from conveyor.api.routes.jobs import PROBLEMS
from conveyor.api.schemas import StorableBody, WorkflowIn
from conveyor.config import WORKFLOW_TASK
from conveyor.jobs import schedules
from conveyor.jobs.schedules import Schedule, ScheduleError
from conveyor.jobs.states import JobState, Priority
from conveyor.tasks import UnknownTask, registry
from conveyor.tasks.submission import StepError, build_steps

router = APIRouter(prefix="/v1/schedules", tags=["schedules"])

Name = Annotated[str, Path(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._-]+$")]
Misfire = Literal["run_once", "skip"]


class ScheduleIn(StorableBody):
    """A schedule to create: exactly one of `cron` and `interval_seconds`."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._-]+$")
    task: str = Field(min_length=1, max_length=200)
    payload: Any = Field(default_factory=dict)
    cron: str | None = Field(None, max_length=200, description="Five-field cron expression")
    interval_seconds: float | None = Field(None, gt=0, le=366 * 86400)
    timezone: str = Field("UTC", max_length=64, description="IANA zone the cron is read in")
    enabled: bool = True
    priority: Priority | None = None
    misfire: Misfire = Field("run_once", description="After beat was down: run once or skip")


class SchedulePatch(StorableBody):
    """Changes to a schedule; give `cron` or `interval_seconds` to change its timing."""

    model_config = ConfigDict(extra="forbid")
    task: str | None = Field(None, min_length=1, max_length=200)
    payload: Any = None
    cron: str | None = Field(None, max_length=200)
    interval_seconds: float | None = Field(None, gt=0, le=366 * 86400)
    timezone: str | None = Field(None, max_length=64)
    enabled: bool | None = None
    priority: Priority | None = None
    misfire: Misfire | None = None


class RunOut(BaseModel):
    """A tick of a schedule and the job it created."""

    tick: dt.datetime
    job_id: uuid.UUID
    state: JobState


class ScheduleOut(BaseModel):
    """A schedule, with its next and last ticks and its most recent runs."""

    name: str
    task: str
    payload: Any
    cron: str | None
    interval_seconds: float | None
    timezone: str
    enabled: bool
    priority: Priority | None
    misfire: Misfire
    next_run_at: dt.datetime | None
    last_run_at: dt.datetime | None
    recent_runs: list[RunOut] = Field(default_factory=list)


class SchedulesOut(BaseModel):
    """The tenant's schedules by name."""

    items: list[ScheduleOut]


def _out(schedule: Schedule, runs: list[RunOut] | None = None) -> ScheduleOut:
    return ScheduleOut(
        name=schedule.name,
        task=schedule.task,
        payload=schedule.payload,
        cron=schedule.cron,
        interval_seconds=schedule.interval_seconds,
        timezone=schedule.timezone,
        enabled=schedule.enabled,
        priority=None if schedule.priority is None else Priority(schedule.priority),
        misfire="skip" if schedule.misfire == "skip" else "run_once",
        next_run_at=schedule.next_run_at,
        last_run_at=schedule.last_run_at,
        recent_runs=runs or [],
    )


def _checked_workflow(payload: Any, tenant: str) -> Any:
    """A scheduled workflow's payload (POST /v1/workflows' body), checked as that is."""
    try:
        body = WorkflowIn.model_validate(payload)
    except ValidationError as error:
        raise Problem(
            422,
            f"the payload of a {WORKFLOW_TASK} schedule is a workflow: {{name?, steps, tags?}}",
            slug="invalid-payload",
            errors=validation_errors(error.errors(), ("body", "payload")),
        ) from None
    try:
        build_steps(registry, body.steps, tenant=tenant)
    except StepError as error:
        raise Problem(
            422,
            error.message,
            slug=error.slug,
            errors=[{**e, "loc": ["body", "payload", "steps", *e["loc"]]} for e in error.errors],
        ) from None
    return body.model_dump(mode="json", exclude_none=True)


def _checked_payload(task: str, payload: Any, tenant: str) -> Any:
    if task == WORKFLOW_TASK:
        return _checked_workflow(payload, tenant)
    try:
        return registry.get(task).validate(payload).model_dump(mode="json")
    except UnknownTask:
        raise Problem(
            422,
            f"unknown task {task!r}",
            slug="unknown-task",
            errors=[{"loc": ["body", "task"], "msg": "no task type has this name"}],
        ) from None
    except ValidationError as error:
        raise Problem(
            422,
            f"the payload does not match the schema of {task!r}",
            slug="invalid-payload",
            errors=validation_errors(error.errors(), ("body", "payload")),
        ) from None


def _timing_problem(error: ScheduleError) -> Problem:
    return Problem(
        422,
        str(error),
        slug="invalid-schedule",
        errors=[{"loc": ["body"], "msg": str(error)}],
    )


@router.get("", response_model=SchedulesOut, responses=PROBLEMS)
def list_schedules(key: Reader, state: State) -> SchedulesOut:
    """The tenant's schedules."""
    with state.read_sessions() as session:
        found = schedules.list_schedules(session, key.tenant)
    return SchedulesOut(items=[_out(s) for s in found])


@router.post("", status_code=201, response_model=ScheduleOut, responses=PROBLEMS)
def create_schedule(
    body: ScheduleIn, key: Submitter, state: State, response: Response
) -> ScheduleOut:
    """Create a schedule; a bad cron expression, zone, task or payload is a 422."""
    payload = _checked_payload(body.task, body.payload, key.tenant)
    try:
        with state.sessions.begin() as session:
            created = schedules.create_schedule(
                session,
                tenant=key.tenant,
                name=body.name,
                task=body.task,
                payload=payload,
                cron=body.cron,
                interval_seconds=body.interval_seconds,
                timezone=body.timezone,
                enabled=body.enabled,
                priority=body.priority.value if body.priority else None,
                misfire=body.misfire,
            )
    except ScheduleError as error:
        raise _timing_problem(error) from None
    except IntegrityError:
        raise Problem(
            409, f"a schedule named {body.name!r} exists", slug="schedule-exists"
        ) from None
    response.headers["Location"] = f"/v1/schedules/{created.name}"
    return _out(created)


def _owned(state: State, tenant: str, name: str) -> Schedule:
    with state.sessions() as session:
        found = schedules.get_schedule(session, tenant, name)
    if found is None:
        raise Problem(404, f"no schedule {name!r}")
    return found


@router.get("/{name}", response_model=ScheduleOut, responses=PROBLEMS)
def get_schedule(name: Name, key: Reader, state: State) -> ScheduleOut:
    """A schedule with its last runs and their states."""
    schedule = _owned(state, key.tenant, name)
    with state.read_sessions() as session:
        runs = schedules.recent_runs(session, schedule.id)
    return _out(schedule, [RunOut(tick=tick, job_id=job.id, state=job.state) for tick, job in runs])


@router.patch("/{name}", response_model=ScheduleOut, responses=PROBLEMS)
def patch_schedule(name: Name, body: SchedulePatch, key: Submitter, state: State) -> ScheduleOut:
    """Change a schedule; beat applies it within seconds, without a restart."""
    schedule = _owned(state, key.tenant, name)
    changes = body.model_dump(exclude_unset=True)
    if "priority" in changes and changes["priority"] is not None:
        changes["priority"] = changes["priority"].value
    if "cron" in changes and changes["cron"] is not None:
        changes.setdefault("interval_seconds", None)
    if "interval_seconds" in changes and changes["interval_seconds"] is not None:
        changes.setdefault("cron", None)
    task = changes.get("task") or schedule.task
    if "task" in changes or "payload" in changes:
        changes["payload"] = _checked_payload(
            task, changes.get("payload", schedule.payload), key.tenant
        )
    try:
        with state.sessions.begin() as session:
            updated = schedules.update_schedule(session, schedule, changes)
    except ScheduleError as error:
        raise _timing_problem(error) from None
    return _out(updated)


@router.delete("/{name}", status_code=204, responses=PROBLEMS)
def delete_schedule(name: Name, key: Submitter, state: State) -> Response:
    """Remove a schedule; the jobs it created stay."""
    with state.sessions.begin() as session:
        if not schedules.delete_schedule(session, key.tenant, name):
            raise Problem(404, f"no schedule {name!r}")
    return Response(status_code=204)
