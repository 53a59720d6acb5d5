"""/v1/jobs: submit a job, read it and its history."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import IntegrityError

from conveyor.api.deps import Reader, State, Submitter
from conveyor.api.paths import JOB_ID
from conveyor.api.problems import PROBLEM_JSON, Problem, validation_errors
from conveyor.api.schemas import (
    BatchIn,
    BatchOut,
    EventOut,
    EventsOut,
    JobIn,
    JobOut,
    JobPage,
    ProblemOut,
)
from conveyor.api.state import ApiState
from conveyor.api.waiting import MAX_WAIT_SECONDS
from conveyor.jobs import outbox, store
from conveyor.jobs.models import Job, NewJob
from conveyor.jobs.states import TERMINAL_STATES, JobState
from conveyor.jobs.store import workflows
from conveyor.observability import logs, metrics
from conveyor.tasks import UnknownTask, registry
from conveyor.tasks.submission import Origin, build_new_job

log = logs.get(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

PROBLEMS: dict[int | str, dict[str, object]] = {
    status: {
        "model": ProblemOut,
        "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/ProblemOut"}}},
    }
    for status in (400, 401, 403, 404, 409, 413, 422, 429, 503)
}


def request_hash(body: JobIn) -> str:
    """A fingerprint of the request, to tell a replay from a different request."""
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _replay(job: Job, digest: str, response: Response) -> JobOut:
    if job.request_hash != digest:
        raise Problem(
            422,
            "this Idempotency-Key was used with a different request body",
            slug="idempotency-key-reused",
        )
    response.status_code = 200
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobOut.of(job)


def _build(
    body: JobIn,
    tenant: str,
    idempotency_key: str | None,
    loc: tuple[str | int, ...] = ("body",),
    origin: Origin | None = None,
) -> NewJob:
    try:
        return build_new_job(
            registry,
            tenant=tenant,
            task=body.task,
            payload=body.payload,
            priority=body.priority.value if body.priority else None,
            run_at=body.run_at,
            delay_seconds=body.delay_seconds,
            max_attempts=body.max_attempts,
            timeout_seconds=body.timeout_seconds,
            tags=body.tags,
            idempotency_key=idempotency_key,
            # Only a replay under the same key is ever compared with it.
            request_hash=None if idempotency_key is None else request_hash(body),
            # JobIn's own validation checked the whole body, its payload included.
            payload_checked=True,
            origin=origin,
        )
    except UnknownTask:
        raise Problem(
            422,
            f"unknown task {body.task!r}",
            slug="unknown-task",
            errors=[{"loc": [*loc, "task"], "msg": "no task type has this name"}],
        ) from None
    except ValidationError as error:
        raise Problem(
            422,
            f"the payload does not match the schema of {body.task!r}",
            slug="invalid-payload",
            errors=validation_errors(error.errors(), (*loc, "payload")),
        ) from None


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    responses={
        **PROBLEMS,
        200: {"model": JobOut, "description": "The job an earlier request with this key made"},
    },
)
async def submit_job(
    body: JobIn,
    key: Submitter,
    state: State,
    response: Response,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None,
) -> Response:
    """Record a job and queue it; with an Idempotency-Key, a repeat returns the same job.

    Keys are scoped to the tenant and kept as long as the job (at least 24 hours): the
    same key and body answer the original job (200), another body 422, and a repeat
    while the first request is still being recorded 409.
    """
    new = _build(body, key.tenant, idempotency_key)
    if idempotency_key is not None:
        keyed = await run_in_threadpool(_submit_keyed, new, key.tenant, state, response)
        return _json(keyed, response, 202)
    # Submissions arriving together share one INSERT, one COMMIT and one publish.
    recorded = await state.committer.submit(new)
    return _json(_accepted(recorded.job, recorded.published, response), response, 202)


def _json(model: BaseModel, response: Response, status: int) -> Response:
    """`model` as JSON with the status and headers set on `response`, serialized once.

    FastAPI would validate a returned model against the response model again before
    serializing it: for a batch, a second pass over 1,000 jobs just built from the store.
    The response model still documents the answer.
    """
    return Response(
        model.model_dump_json(),
        status_code=response.status_code or status,
        headers=dict(response.headers),
        media_type="application/json",
    )


def _accepted(job: Job, published: bool, response: Response) -> JobOut:
    metrics.count_submitted([job])
    log.info("job submitted", job_id=str(job.id), task=job.task, queue=job.queue)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not published:
        response.headers["Conveyor-Publish"] = "deferred"
    return JobOut.of(job)


def _submit_keyed(new: NewJob, tenant: str, state: ApiState, response: Response) -> JobOut:
    """A submission under an Idempotency-Key: a transaction of its own, holding the key."""
    idempotency_key = new.idempotency_key
    assert idempotency_key is not None
    digest = new.request_hash or ""
    sessions = state.sessions
    try:
        with sessions.begin() as session:
            if not store.lock_idempotency_key(session, tenant, idempotency_key):
                raise Problem(
                    409,
                    "a request with this Idempotency-Key is still in progress",
                    slug="idempotency-key-in-progress",
                    headers={"Retry-After": "1"},
                )
            existing = store.find_by_idempotency_key(session, tenant, idempotency_key)
            if existing is not None:
                return _replay(existing, digest, response)
            job = store.create_job(session, new)
    except IntegrityError:
        with sessions() as session:
            existing = store.find_by_idempotency_key(session, tenant, idempotency_key)
        if existing is None:
            raise Problem(409, "a request with this Idempotency-Key is in progress") from None
        return _replay(existing, digest, response)
    published = outbox.publish_recorded(sessions, state.publisher, [job])
    return _accepted(job, published, response)


@router.post("/batch", status_code=202, response_model=BatchOut, responses=PROBLEMS)
async def submit_batch(body: BatchIn, key: Submitter, state: State, response: Response) -> Response:
    """Record up to 1,000 jobs at once: all are validated before any is accepted."""
    origin = Origin.current()
    new_jobs = [
        _build(item, key.tenant, None, ("body", "jobs", index), origin)
        for index, item in enumerate(body.jobs)
    ]
    # All or none, in one statement, with the single submissions waiting at that moment.
    recorded = await state.committer.submit_all(new_jobs)
    jobs = [r.job for r in recorded]
    metrics.count_submitted(jobs)
    log.info("jobs submitted", count=len(jobs))
    if not all(r.published for r in recorded):
        response.headers["Conveyor-Publish"] = "deferred"
    return _json(BatchOut(jobs=[JobOut.of(job) for job in jobs]), response, 202)


@router.get("", response_model=JobPage, responses=PROBLEMS)
def list_jobs(
    key: Reader,
    state: State,
    job_state: Annotated[JobState | None, Query(alias="state")] = None,
    task: Annotated[str | None, Query(max_length=200)] = None,
    tag: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> JobPage:
    """The tenant's jobs, newest first, a page at a time; pages stay stable as jobs arrive."""
    page, next_cursor = jobs_page(state, key.tenant, job_state, task, tag, limit, cursor)
    return JobPage(items=[JobOut.of(job) for job in page], next_cursor=next_cursor)


def jobs_page(
    state: ApiState,
    tenant: str,
    job_state: JobState | None,
    task: str | None,
    tag: str | None,
    limit: int,
    cursor: str | None,
) -> tuple[list[Job], str | None]:
    """A page of a tenant's jobs, newest first, and the cursor of the next (None at the
    end); 422 for a cursor this API did not hand out."""
    after = decode_cursor(cursor) if cursor else None
    with state.read_sessions() as session:
        page = store.list_jobs_page(
            session,
            tenant=tenant,
            state=job_state,
            task=task,
            tag=tag,
            limit=limit + 1,
            before=after,
        )
    more = len(page) > limit
    page = page[:limit]
    next_cursor = encode_cursor(page[-1].created_at, page[-1].id) if more and page else None
    return page, next_cursor


def encode_cursor(created_at: dt.datetime, job_id: uuid.UUID) -> str:
    """An opaque cursor naming the last job of a page."""
    raw = json.dumps([created_at.isoformat(), str(job_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, uuid.UUID]:
    """The position a cursor names; 422 for anything this API did not hand out."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, job_id = json.loads(base64.urlsafe_b64decode(padded))
        at = dt.datetime.fromisoformat(created)
        if at.tzinfo is None:
            raise ValueError("naive time")
        return at, uuid.UUID(job_id)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise Problem(
            422,
            "the cursor is not one this API handed out",
            slug="invalid-cursor",
            errors=[{"loc": ["query", "cursor"], "msg": "invalid cursor"}],
        ) from None


def _owned(state: State, job_id: uuid.UUID, tenant: str) -> Job:
    # From the replica when it has the job; from the primary when it has not yet.
    job = state.read_sessions.first_found(lambda s: store.get_job(s, job_id, tenant=tenant))
    if job is None:
        raise Problem(404, f"no job {job_id}")
    return job


WaitSeconds = Annotated[
    float,
    Query(
        ge=0,
        le=MAX_WAIT_SECONDS,
        description="Answer once the job has finished, or after this many seconds (0-60)",
    ),
]


@router.get(JOB_ID, response_model=JobOut, responses=PROBLEMS)
async def get_job(job_id: uuid.UUID, key: Reader, state: State, wait: WaitSeconds = 0) -> JobOut:
    """One job of the caller's tenant; with `wait`, as soon as it has finished."""
    job = await run_in_threadpool(_owned, state, job_id, key.tenant)
    if wait > 0 and job.state not in TERMINAL_STATES:
        # One shared poll of the store answers every waiting request (api/waiting.py),
        # with the job as it read it; a wait that runs out reads the job once more.
        finished = await state.waiters.wait(job_id, wait)
        if finished is None:
            finished = await run_in_threadpool(_owned, state, job_id, key.tenant)
        job = finished
    return JobOut.of(job)


@router.get("/{job_id}/events", response_model=EventsOut, responses=PROBLEMS)
def get_events(job_id: uuid.UUID, key: Reader, state: State) -> EventsOut:
    """Every state change of a job, oldest first, with time, attempt and worker."""
    _owned(state, job_id, key.tenant)
    with state.read_sessions() as session:
        events = store.list_events(session, job_id)
    return EventsOut(job_id=job_id, items=[EventOut.of(e) for e in events])


def _refused(job_id: uuid.UUID, current: Job | None, rule: str, slug: str) -> Problem:
    """Why a state change did not happen: no such job (404), or its state forbids it (409)."""
    if current is None:
        return Problem(404, f"no job {job_id}")
    return Problem(409, f"job {job_id} is {current.state.value}; {rule}", slug=slug)


@router.post("/{job_id}/cancel", response_model=JobOut, responses=PROBLEMS)
def cancel_job(job_id: uuid.UUID, key: Submitter, state: State) -> JobOut:
    """Cancel a job that has not finished; a running one is stopped within seconds."""
    with state.sessions.begin() as session:
        job = store.cancel(session, job_id, tenant=key.tenant)
        if job is None:
            current = store.get_job(session, job_id, tenant=key.tenant)
    if job is None:
        raise _refused(job_id, current, "only unfinished jobs can be cancelled", "not-cancellable")
    metrics.count_finished(job, "cancelled")
    log.info("job cancelled", job_id=str(job.id), task=job.task, queue=job.queue)
    if job.workflow_id is not None:
        # Steps that run whatever it did may have been released by its cancel.
        with state.sessions() as session:
            released = workflows.released_after(session, [job.id])
        outbox.publish_recorded(state.sessions, state.publisher, released)
    return JobOut.of(job)


@router.post("/{job_id}/retry", response_model=JobOut, responses=PROBLEMS)
def retry_job(job_id: uuid.UUID, key: Submitter, state: State) -> JobOut:
    """Queue a dead or cancelled job again under the same id."""
    with state.sessions.begin() as session:
        job = store.requeue(session, job_id, tenant=key.tenant)
        if job is None:
            current = store.get_job(session, job_id, tenant=key.tenant)
    if job is None:
        rule = "only dead or cancelled jobs can be retried"
        raise _refused(job_id, current, rule, "not-retryable")
    outbox.publish_recorded(state.sessions, state.publisher, [job])
    return JobOut.of(job)
