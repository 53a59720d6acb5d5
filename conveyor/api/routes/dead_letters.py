"""/v1/dead-letters: dead jobs, grouped, replayed or removed."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from conveyor.api.deps import Admin, Reader, State, Submitter
from conveyor.api.paths import JOB_ID
from conveyor.api.problems import Problem
from conveyor.api.routes.jobs import PROBLEMS
from conveyor.api.schemas import JobOut
from conveyor.jobs import outbox, store

router = APIRouter(prefix="/v1/dead-letters", tags=["dead letters"])

REPLAY_LIMIT = 10_000


class DeadGroup(BaseModel):
    """Dead jobs sharing a task, an error type and an error fingerprint."""

    task: str
    error_type: str
    fingerprint: str
    count: int


class DeadLetters(BaseModel):
    """Dead jobs, most recent first, and their groups."""

    items: list[JobOut]
    groups: list[DeadGroup]


class ReplayIn(BaseModel):
    """Which dead jobs to queue again: ids, or a filter (none given: every dead job)."""

    model_config = ConfigDict(extra="forbid")
    ids: list[uuid.UUID] | None = Field(None, max_length=REPLAY_LIMIT)
    task: str | None = Field(None, max_length=200)
    error_type: str | None = Field(None, max_length=200)


class ReplayOut(BaseModel):
    """How many dead jobs were queued again."""

    replayed: int


@router.get("", response_model=DeadLetters, responses=PROBLEMS)
def list_dead_letters(
    key: Reader,
    state: State,
    task: Annotated[str | None, Query(max_length=200)] = None,
    error_type: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> DeadLetters:
    """Dead jobs of the caller's tenant, filtered by task and error type, with grouped counts."""
    with state.read_sessions() as session:
        dead = store.list_dead(
            session, tenant=key.tenant, task=task, error_type=error_type, limit=limit
        )
        groups = store.dead_groups(session, tenant=key.tenant)
    return DeadLetters(
        items=[JobOut.of(job) for job in dead],
        groups=[
            DeadGroup(task=t, error_type=e, fingerprint=f, count=n)
            for t, e, f, n in groups
            if (task is None or t == task) and (error_type is None or e == error_type)
        ],
    )


@router.post("/replay", response_model=ReplayOut, responses=PROBLEMS)
def replay_dead_letters(body: ReplayIn, key: Submitter, state: State) -> ReplayOut:
    """Queue dead jobs again under their own ids; answers how many."""
    with state.sessions.begin() as session:
        if body.ids is not None:
            targets = body.ids
        else:
            dead = store.list_dead(
                session,
                tenant=key.tenant,
                task=body.task,
                error_type=body.error_type,
                limit=REPLAY_LIMIT,
            )
            targets = [job.id for job in dead]
        replayed = []
        for job_id in targets:
            current = store.get_job(session, job_id, tenant=key.tenant)
            if current is None or current.state.value != "dead":
                continue
            job = store.requeue(session, job_id, tenant=key.tenant)
            if job is not None:
                replayed.append(job)
    outbox.publish_recorded(state.sessions, state.publisher, replayed)
    return ReplayOut(replayed=len(replayed))


@router.delete(JOB_ID, status_code=204, responses=PROBLEMS)
def delete_dead_letter(job_id: uuid.UUID, key: Admin, state: State) -> Response:
    """Remove a dead job and its history for good."""
    with state.sessions.begin() as session:
        deleted = store.delete_dead(session, job_id, tenant=key.tenant)
    if not deleted:
        raise Problem(404, f"no dead job {job_id}")
    return Response(status_code=204)
