"""Turning a request to run a task into a NewJob, checked against the task type."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import ValidationError

from conveyor.jobs.models import NewJob, NewStep
from conveyor.jobs.workflow_graph import check_graph
from conveyor.observability import tracing
from conveyor.observability.logs import current_request_id
from conveyor.tasks.json_values import require_storable
from conveyor.tasks.registry import Registry, UnknownTask


@dataclass(frozen=True, slots=True)
class Origin:
    """Where new jobs come from: the trace they join (None: each starts its own) and
    the API request that submits them."""

    traceparent: str | None
    request_id: str | None

    @classmethod
    def current(cls) -> Origin:
        """The current span's trace and the request being handled (read once for a batch)."""
        return cls(tracing.current_traceparent(), current_request_id())


def build_new_job(
    registry: Registry,
    *,
    tenant: str,
    task: str,
    payload: Any,
    priority: str | None = None,
    run_at: dt.datetime | None = None,
    delay_seconds: float | None = None,
    max_attempts: int | None = None,
    timeout_seconds: float | None = None,
    tags: list[str] | None = None,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    now: dt.datetime | None = None,
    payload_checked: bool = False,
    origin: Origin | None = None,
) -> NewJob:
    """A NewJob with the task type's defaults filled in.

    Raises UnknownTask for an unregistered task and pydantic's ValidationError for a
    payload its model refuses or the store could not keep as given (a number that is not
    finite, a NUL character, a lone surrogate). The stored payload is the validated one,
    in JSON form. The job belongs to the current trace and API request, or to a new trace.
    `payload_checked` says the caller has already checked the payload as given (the API's
    request models check the whole body); `origin`, read once, serves a batch's jobs.
    """
    task_type = registry.get(task)
    origin = origin or Origin.current()
    # Checked as given, since the JSON form would quietly hold null for an infinity; and
    # as stored, for what the model itself produced.
    if not payload_checked:
        require_storable(payload, task_type.payload_model.__name__)
    model = task_type.validate(payload)
    stored = model.model_dump(mode="json")
    require_storable(stored, task_type.payload_model.__name__)
    if delay_seconds is not None:
        run_at = (now or dt.datetime.now(dt.UTC)) + dt.timedelta(seconds=delay_seconds)
    chosen = priority or task_type.priority.value
    return NewJob(
        tenant=tenant,
        task=task,
        payload=stored,
        priority=chosen,
        queue=chosen,
        max_attempts=max_attempts or task_type.max_attempts,
        timeout_seconds=timeout_seconds or task_type.timeout_seconds,
        tags=list(tags or []),
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        run_at=run_at,
        traceparent=origin.traceparent or tracing.new_traceparent(),
        request_id=origin.request_id,
    )


class StepLike(Protocol):
    """A workflow step as a request gives it (the API's StepIn)."""

    @property
    def key(self) -> str: ...

    @property
    def task(self) -> str: ...

    @property
    def payload(self) -> Any: ...

    @property
    def after(self) -> Sequence[str]: ...

    @property
    def run_if(self) -> str: ...

    @property
    def max_attempts(self) -> int | None: ...

    @property
    def timeout_seconds(self) -> float | None: ...

    @property
    def tags(self) -> Sequence[str]: ...

    @property
    def priority_name(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class StepError(Exception):
    """What is wrong with a workflow's steps: where (`loc`, from the step list), why, and
    the problem's slug."""

    loc: tuple[str | int, ...]
    message: str
    slug: str
    errors: list[dict[str, Any]]


def build_steps(
    registry: Registry, steps: Sequence[StepLike], *, tenant: str, origin: Origin | None = None
) -> list[NewStep]:
    """Every step checked (the graph, then each task and payload) before any is kept:
    StepError for the first thing wrong, its `errors` naming every place (loc from the
    step list: `(index, field, ...)`)."""
    problems = check_graph([s.key for s in steps], [s.after for s in steps])
    if problems:
        raise StepError(
            (problems[0].index, problems[0].field),
            "the steps do not form a workflow: " + problems[0].message,
            "invalid-workflow",
            [{"loc": [p.index, p.field], "msg": p.message} for p in problems],
        )
    origin = origin or Origin.current()
    made = []
    for index, item in enumerate(steps):
        try:
            new = build_new_job(
                registry,
                tenant=tenant,
                task=item.task,
                payload=item.payload,
                priority=item.priority_name,
                max_attempts=item.max_attempts,
                timeout_seconds=item.timeout_seconds,
                tags=list(item.tags),
                origin=origin,
            )
        except UnknownTask:
            message = f"step {item.key!r}: unknown task {item.task!r}"
            unknown = [{"loc": [index, "task"], "msg": "no task type has this name"}]
            raise StepError((index, "task"), message, "unknown-task", unknown) from None
        except ValidationError as error:
            first = error.errors()[0]
            message = f"step {item.key!r}: the payload does not match the schema of {item.task!r}"
            errors: list[dict[str, Any]] = [
                {"loc": [index, "payload", *e["loc"]], "msg": e["msg"]} for e in error.errors()
            ]
            loc = (index, "payload", *first["loc"])
            raise StepError(loc, message, "invalid-payload", errors) from None
        made.append(NewStep(item.key, new, tuple(item.after), item.run_if))
    return made
