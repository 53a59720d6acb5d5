"""Transitions from outside a run: cancel, retry (requeue), and the stop window between.

A run that is cancelled keeps its lease as a stop window until it reports that it
stopped or the lease lapses; a retry of that job waits for the window to end, so two
runs of one job never overlap.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy.orm import Session

from conveyor.jobs.models import Job
from conveyor.jobs.states import CANCELLABLE_STATES, REQUEUEABLE_STATES, JobState
from conveyor.jobs.store.driver import database_now
from conveyor.jobs.store.reads import get_job
from conveyor.jobs.store.writes import record_event, update_job
from conveyor.jobs.tables import jobs


def cancel(
    session: Session,
    job_id: uuid.UUID,
    *,
    tenant: str | None = None,
    now: dt.datetime | None = None,
) -> Job | None:
    """Any non-terminal state → cancelled; a running job's worker sees it and stops.

    None only when the job is missing or already finished: a cancel that races another
    transition (a claim, a promotion) reads the row again and cancels its new state.
    """
    now = database_now(session, now)
    for _ in range(10):
        before = get_job(session, job_id, tenant=tenant)
        if before is None or before.state not in CANCELLABLE_STATES:
            return None
        # The lease is left as it is: a running job's becomes its run's stop window, and
        # a retry still waiting for a cancelled run to stop keeps that run's window.
        values: dict[str, Any] = {
            "state": JobState.CANCELLED.value,
            "cancel_requested": True,
            "finished_at": now,
            "run_after": None,
            "updated_at": now,
        }
        job = update_job(
            session,
            job_id,
            [jobs.c.state == before.state.value, jobs.c.lease_token == before.lease_token],
            values,
        )
        if job is not None:
            record_event(session, job, "cancelled", before.state, at=now, worker=before.worker)
            return job
    raise RuntimeError(f"job {job_id} kept changing while being cancelled")


def requeue(
    session: Session,
    job_id: uuid.UUID,
    *,
    tenant: str | None = None,
    now: dt.datetime | None = None,
) -> Job | None:
    """dead or cancelled → queued under the same id, with its attempts counted afresh
    (a workflow step whose parents are not done → pending).

    The lease token is kept, so the next claim takes a token no earlier run held. A job
    cancelled while running whose run may still be stopping (its lease has not lapsed
    and the run has not reported that it stopped) waits `scheduled` until that lease
    ends: two runs of one job never overlap.
    """
    now = database_now(session, now)
    before = get_job(session, job_id, tenant=tenant)
    if before is None or before.state not in REQUEUEABLE_STATES:
        return None
    stopping = before.lease_expires_at is not None and before.lease_expires_at > now
    # A workflow step whose parents are not all done (or did not all succeed, for one
    # that runs only on success) waits for them again: it is released when they are.
    waits = before.workflow_id is not None and (
        before.parents_left > 0 or (before.run_if == "succeeded" and before.parents_failed > 0)
    )
    state = JobState.PENDING if waits else JobState.SCHEDULED if stopping else JobState.QUEUED
    values: dict[str, Any] = {
        "state": state.value,
        "attempts": 0,
        "finished_at": None,
        "cancel_requested": False,
        "worker": None,
        "published_at": None,
        "run_after": before.lease_expires_at if stopping and not waits else None,
        "updated_at": now,
    }
    if not stopping:
        values["lease_expires_at"] = None
    job = update_job(
        session,
        job_id,
        [jobs.c.state == before.state.value, jobs.c.lease_token == before.lease_token],
        values,
    )
    if job is not None:
        detail = {"waits_for_run_to_stop": True} if stopping else None
        record_event(session, job, "requeued", before.state, at=now, detail=detail)
    return job


def stopped(
    session: Session,
    job_id: uuid.UUID,
    *,
    worker: str,
    token: int,
    now: dt.datetime | None = None,
) -> Job | None:
    """A run that was taken away has stopped: end its stop window.

    A retry waiting for this run (see `requeue`) becomes due at once. None when the job
    has moved on (a newer run holds it) or the run's lease had already ended.
    """
    now = database_now(session, now)
    job = update_job(
        session,
        job_id,
        [
            jobs.c.lease_token == token,
            jobs.c.state != JobState.RUNNING.value,
            jobs.c.lease_expires_at.is_not(None),
        ],
        {"lease_expires_at": None},
    )
    if job is None:
        return None
    if job.state == JobState.SCHEDULED and job.run_after is not None and job.run_after > now:
        job = (
            update_job(
                session,
                job_id,
                [jobs.c.state == JobState.SCHEDULED.value, jobs.c.lease_token == token],
                {"run_after": now, "published_at": None, "updated_at": now},
            )
            or job
        )
    record_event(session, job, "stopped", job.state, at=now, worker=worker)
    return job
