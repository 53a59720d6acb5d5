"""Workflows in the job store: recording one, reading it, cancelling it.

The steps are jobs; what moves a step when its parents finish is the trigger of
migration 0008, inside the parent's own transition. What is here runs in the caller's
transaction.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, and_, func, insert, or_, select, update
from sqlalchemy.orm import Session

from conveyor.jobs.models import Job, NewStep
from conveyor.jobs.states import JobState
from conveyor.jobs.store.cancellation import cancel
from conveyor.jobs.store.driver import database_now
from conveyor.jobs.store.writes import insert_created, new_job_values
from conveyor.jobs.tables import job_events, job_parents, jobs, workflows

__all__ = [
    "NewStep",
    "Step",
    "Workflow",
]

RUNNING = "running"
CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class Step:
    """A step as recorded: its job's id, task, state and attempts, and its parents."""

    key: str
    job_id: uuid.UUID
    task: str
    state: JobState
    after: list[str]
    attempts: int


@dataclass(frozen=True, slots=True)
class Workflow:
    """One row of the workflows table."""

    id: uuid.UUID
    tenant: str
    name: str | None
    state: str
    tags: list[str]
    steps_total: int
    steps_left: int
    steps_failed: int
    idempotency_key: str | None
    request_hash: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None
    steps: list[Step] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        """Whether every step has reached a terminal state."""
        return self.steps_left == 0

    @classmethod
    def from_row(cls, row: Any) -> Workflow:
        """Build from a row of the workflows table."""
        return cls(**{name: row[name] for name in _COLUMNS})


_COLUMNS = (
    "id",
    "tenant",
    "name",
    "state",
    "tags",
    "steps_total",
    "steps_left",
    "steps_failed",
    "idempotency_key",
    "request_hash",
    "created_at",
    "updated_at",
    "finished_at",
)


def create_workflow(
    session: Session,
    *,
    tenant: str,
    name: str | None,
    tags: Sequence[str],
    steps: Sequence[NewStep],
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    now: dt.datetime | None = None,
) -> tuple[Workflow, list[Job]]:
    """Record the workflow, its steps (with their `created` events) and their edges.

    The graph must have been checked (conveyor.jobs.workflow_graph). Steps without
    parents are queued (or scheduled), the rest pending. Returns the workflow, read back
    with its steps, and its steps' jobs, in the order given.
    """
    now = database_now(session, now)
    workflow_id = uuid.uuid4()
    session.execute(
        insert(workflows),
        {
            "id": workflow_id,
            "tenant": tenant,
            "name": name,
            "state": RUNNING,
            "tags": list(tags),
            "steps_total": len(steps),
            "steps_left": len(steps),
            "steps_failed": 0,
            "idempotency_key": idempotency_key,
            "request_hash": request_hash,
            "created_at": now,
            "updated_at": now,
            "finished_at": None,
        },
    )
    rows = []
    for step in steps:
        values = new_job_values(step.job, now)
        values.update(
            workflow_id=workflow_id,
            step=step.key,
            run_if=step.run_if,
            parents_left=len(step.after),
            parents_failed=0,
        )
        if step.after:
            values.update(state=JobState.PENDING.value, run_after=None)
        rows.append(values)
    created = insert_created(
        session, rows, now, lambda row: {"workflow_id": str(workflow_id), "step": row["step"]}
    )
    ids = {step.key: job.id for step, job in zip(steps, created, strict=True)}
    edges = [
        {"parent_id": ids[parent], "job_id": ids[step.key]}
        for step in steps
        for parent in step.after
    ]
    if edges:
        session.execute(insert(job_parents), edges)
    workflow = get_workflow(session, workflow_id, steps=True)
    assert workflow is not None
    return workflow, created


def get_workflow(
    session: Session, workflow_id: uuid.UUID, *, tenant: str | None = None, steps: bool = False
) -> Workflow | None:
    """The workflow (with its steps when asked), or None if missing or another tenant's."""
    statement = select(workflows).where(workflows.c.id == workflow_id)
    if tenant is not None:
        statement = statement.where(workflows.c.tenant == tenant)
    row = session.execute(statement).mappings().first()
    if row is None:
        return None
    workflow = Workflow.from_row(row)
    if steps:
        workflow.steps.extend(workflow_steps(session, workflow_id))
    return workflow


def workflow_steps(session: Session, workflow_id: uuid.UUID) -> list[Step]:
    """The workflow's steps in the order they were given, each with its parents' keys."""
    parent = jobs.alias("parent")
    edges = (
        select(job_parents.c.job_id, parent.c.step)
        .join(parent, parent.c.id == job_parents.c.parent_id)
        .where(parent.c.workflow_id == workflow_id)
    )
    after: dict[uuid.UUID, list[str]] = {}
    for job_id, key in session.execute(edges):
        after.setdefault(job_id, []).append(key)
    statement = (
        select(jobs.c.id, jobs.c.step, jobs.c.task, jobs.c.state, jobs.c.attempts)
        .where(jobs.c.workflow_id == workflow_id)
        # In the order given: their `created` events were written in that order.
        .order_by(
            select(func.min(job_events.c.id))
            .where(job_events.c.job_id == jobs.c.id)
            .scalar_subquery()
        )
    )
    found = [
        Step(key, job_id, task, JobState(state), sorted(after.get(job_id, [])), attempts)
        for job_id, key, task, state, attempts in session.execute(statement)
    ]
    return found


def find_workflow_by_idempotency_key(session: Session, tenant: str, key: str) -> Workflow | None:
    """The tenant's workflow recorded under this idempotency key, if any."""
    statement = select(workflows).where(
        workflows.c.tenant == tenant, workflows.c.idempotency_key == key
    )
    row = session.execute(statement).mappings().first()
    return None if row is None else Workflow.from_row(row)


def list_workflows_page(
    session: Session,
    *,
    tenant: str,
    state: str | None,
    limit: int,
    before: tuple[dt.datetime, uuid.UUID] | None = None,
) -> list[Workflow]:
    """The tenant's workflows newest first, from just before `before` (created_at, id)."""
    statement: Select[Any] = select(workflows).where(workflows.c.tenant == tenant)
    if state is not None:
        statement = statement.where(workflows.c.state == state)
    if before is not None:
        at, last = before
        statement = statement.where(
            or_(
                workflows.c.created_at < at,
                and_(workflows.c.created_at == at, workflows.c.id < last),
            )
        )
    statement = statement.order_by(workflows.c.created_at.desc(), workflows.c.id.desc()).limit(
        limit
    )
    return [Workflow.from_row(r) for r in session.execute(statement).mappings()]


def finished_workflows_among(
    session: Session, workflow_ids: list[uuid.UUID]
) -> dict[uuid.UUID, Workflow]:
    """Those of the workflows whose every step is terminal, by id (one query for all)."""
    if not workflow_ids:
        return {}
    statement = select(workflows).where(
        workflows.c.id.in_(workflow_ids), workflows.c.steps_left == 0
    )
    return {row["id"]: Workflow.from_row(row) for row in session.execute(statement).mappings()}


def cancel_workflow(
    session: Session,
    workflow_id: uuid.UUID,
    *,
    tenant: str | None = None,
    now: dt.datetime | None = None,
) -> Workflow | None:
    """Cancel every unfinished step (a running one is told to stop); the workflow after.

    None when it does not exist (or is another tenant's); a finished workflow is
    returned unchanged. The steps are cancelled in id order, as the trigger locks them.
    """
    now = database_now(session, now)
    locked = select(workflows).where(workflows.c.id == workflow_id).with_for_update()
    if tenant is not None:
        locked = locked.where(workflows.c.tenant == tenant)
    row = session.execute(locked).mappings().first()
    if row is None:
        return None
    workflow = Workflow.from_row(row)
    if workflow.finished:
        return workflow
    session.execute(
        update(workflows)
        .where(workflows.c.id == workflow_id)
        .values(state=CANCELLED, updated_at=now)
    )
    unfinished = (
        select(jobs.c.id)
        .where(
            jobs.c.workflow_id == workflow_id,
            jobs.c.state.not_in(
                [s.value for s in (JobState.SUCCEEDED, JobState.DEAD, JobState.CANCELLED)]
            ),
        )
        .order_by(jobs.c.id)
    )
    for (job_id,) in session.execute(unfinished).all():
        cancel(session, job_id, now=now)
    return get_workflow(session, workflow_id)


def released_after(session: Session, parent_ids: Iterable[uuid.UUID]) -> list[Job]:
    """The children of these steps that are queued and not yet published (to publish)."""
    ids = list(parent_ids)
    if not ids:
        return []
    children = select(job_parents.c.job_id).where(job_parents.c.parent_id.in_(ids))
    statement = select(jobs).where(
        jobs.c.id.in_(children),
        jobs.c.state == JobState.QUEUED.value,
        jobs.c.published_at.is_(None),
    )
    return [Job.from_row(r) for r in session.execute(statement).mappings()]


def parent_results(session: Session, job_id: uuid.UUID) -> dict[str, Any]:
    """The results of the step's parents that succeeded, by their keys."""
    statement = (
        select(jobs.c.step, jobs.c.result)
        .join(job_parents, job_parents.c.parent_id == jobs.c.id)
        .where(job_parents.c.job_id == job_id, jobs.c.state == JobState.SUCCEEDED.value)
    )
    return {key: result for key, result in session.execute(statement)}


def workflow_counts(
    session: Session, tenant: str | None = None, since: dt.datetime | None = None
) -> dict[str, int]:
    """How many workflows are in each state (of a tenant, started since a time)."""
    statement = select(workflows.c.state, func.count()).group_by(workflows.c.state)
    if tenant is not None:
        statement = statement.where(workflows.c.tenant == tenant)
    if since is not None:
        statement = statement.where(workflows.c.created_at >= since)
    return {state: int(count) for state, count in session.execute(statement)}
