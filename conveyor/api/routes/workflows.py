"""/v1/workflows: submit a graph of steps, read it, wait for it, cancel it."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from conveyor.api.deps import Reader, State, Submitter
from conveyor.api.problems import Problem
from conveyor.api.routes.jobs import PROBLEMS, WaitSeconds, decode_cursor, encode_cursor
from conveyor.api.schemas import WorkflowIn, WorkflowOut, WorkflowPage
from conveyor.jobs import outbox
from conveyor.jobs.store import workflows as flows
from conveyor.observability import logs, metrics
from conveyor.tasks import registry
from conveyor.tasks.submission import StepError, build_steps

log = logs.get(__name__)
router = APIRouter(prefix="/v1/workflows", tags=["workflows"])


def _digest(body: WorkflowIn) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _steps(body: WorkflowIn, tenant: str) -> list[flows.NewStep]:
    """Every step checked (graph first, then each task and payload) before any is kept."""
    try:
        return build_steps(registry, body.steps, tenant=tenant)
    except StepError as error:
        raise Problem(
            422,
            error.message,
            slug=error.slug,
            errors=[{**e, "loc": ["body", "steps", *e["loc"]]} for e in error.errors],
        ) from None


def _submit(
    state: State, body: WorkflowIn, tenant: str, idempotency_key: str | None
) -> tuple[flows.Workflow, bool]:
    """The workflow recorded (and its first steps published), or the one a replay names;
    whether it was recorded now."""
    steps = _steps(body, tenant)
    digest = None if idempotency_key is None else _digest(body)
    try:
        with state.sessions.begin() as session:
            if idempotency_key is not None:
                existing = flows.find_workflow_by_idempotency_key(session, tenant, idempotency_key)
                if existing is not None:
                    return _replayed(existing, digest), False
            workflow, jobs = flows.create_workflow(
                session,
                tenant=tenant,
                name=body.name,
                tags=body.tags,
                steps=steps,
                idempotency_key=idempotency_key,
                request_hash=digest,
            )
    except IntegrityError:
        if idempotency_key is None:
            raise
        with state.sessions() as session:
            existing = flows.find_workflow_by_idempotency_key(session, tenant, idempotency_key)
        if existing is None:
            raise Problem(409, "a request with this Idempotency-Key is in progress") from None
        return _replayed(existing, digest), False
    ready = [job for job in jobs if job.state.value == "queued"]
    outbox.publish_recorded(state.sessions, state.publisher, ready)
    metrics.count_submitted(jobs)
    metrics.WORKFLOWS_SUBMITTED.inc()
    return workflow, True


def _replayed(workflow: flows.Workflow, digest: str | None) -> flows.Workflow:
    if workflow.request_hash != digest:
        raise Problem(
            422,
            "this Idempotency-Key was used with a different request body",
            slug="idempotency-key-reused",
        )
    return workflow


def _owned(
    state: State, workflow_id: uuid.UUID, tenant: str, *, fresh: bool = False
) -> flows.Workflow:
    """The tenant's workflow with its steps: from the primary when `fresh` (after a
    write), else from the replica when it has it."""

    def read(session: Session) -> flows.Workflow | None:
        return flows.get_workflow(session, workflow_id, tenant=tenant, steps=True)

    if fresh:
        with state.sessions() as session:
            workflow = read(session)
    else:
        workflow = state.read_sessions.first_found(read)
    if workflow is None:
        raise Problem(404, f"no workflow {workflow_id}")
    return workflow


@router.post("", status_code=202, response_model=WorkflowOut, responses=PROBLEMS)
def submit_workflow(
    body: WorkflowIn,
    key: Submitter,
    state: State,
    response: Response,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None,
) -> WorkflowOut:
    """Record a workflow whose every step is checked first; its first steps start at once."""
    workflow, new = _submit(state, body, key.tenant, idempotency_key)
    if not new:
        response.status_code = 200
    response.headers["Location"] = f"/v1/workflows/{workflow.id}"
    log.info("workflow submitted", workflow_id=str(workflow.id), steps=workflow.steps_total)
    # A new workflow was read back with its steps as recorded; a replay is read now.
    return WorkflowOut.of(workflow if new else _owned(state, workflow.id, key.tenant))


@router.get("/{workflow_id}", response_model=WorkflowOut, responses=PROBLEMS)
async def get_workflow(
    workflow_id: uuid.UUID, key: Reader, state: State, wait: WaitSeconds = 0
) -> WorkflowOut:
    """One workflow with its steps; with `wait`, as soon as every step has finished."""
    workflow = await run_in_threadpool(_owned, state, workflow_id, key.tenant)
    if wait > 0 and not workflow.finished:
        # The shared poll (api/waiting.py) wakes this request; its steps are read once.
        await state.workflow_waiters.wait(workflow_id, wait)
        workflow = await run_in_threadpool(_owned, state, workflow_id, key.tenant)
    return WorkflowOut.of(workflow)


@router.get("", response_model=WorkflowPage, responses=PROBLEMS)
def list_workflows(
    key: Reader,
    state: State,
    workflow_state: Annotated[
        Literal["running", "succeeded", "failed", "cancelled"] | None, Query(alias="state")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> WorkflowPage:
    """The tenant's workflows, newest first, a page at a time (without their steps)."""
    after = decode_cursor(cursor) if cursor else None
    with state.read_sessions() as session:
        page = flows.list_workflows_page(
            session, tenant=key.tenant, state=workflow_state, limit=limit + 1, before=after
        )
    more = len(page) > limit
    page = page[:limit]
    next_cursor = encode_cursor(page[-1].created_at, page[-1].id) if more and page else None
    return WorkflowPage(items=[WorkflowOut.of(w) for w in page], next_cursor=next_cursor)


@router.post("/{workflow_id}/cancel", response_model=WorkflowOut, responses=PROBLEMS)
def cancel_workflow(workflow_id: uuid.UUID, key: Submitter, state: State) -> WorkflowOut:
    """Cancel every unfinished step (running ones are stopped); 409 once it has finished."""
    with state.sessions.begin() as session:
        before = flows.get_workflow(session, workflow_id, tenant=key.tenant)
        if before is None:
            raise Problem(404, f"no workflow {workflow_id}")
        if before.finished:
            raise Problem(
                409, f"workflow {workflow_id} is {before.state}; it has finished", slug="finished"
            )
        flows.cancel_workflow(session, workflow_id, tenant=key.tenant)
    log.info("workflow cancelled", workflow_id=str(workflow_id))
    return WorkflowOut.of(_owned(state, workflow_id, key.tenant, fresh=True))
