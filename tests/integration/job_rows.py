"""Job rows with chosen timestamps, valid under the jobs table's CHECK constraints."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, insert
from sqlalchemy.orm import Session, sessionmaker

from conveyor.jobs.rollups import MARK
from conveyor.jobs.states import TERMINAL_STATES
from conveyor.jobs.tables import job_events, job_rollups, jobs, marks

TERMINAL = {s.value for s in TERMINAL_STATES}


def job_row(
    *,
    state: str,
    created_at: dt.datetime,
    tenant: str = "acme",
    task: str = "demo.echo",
    scheduled_at: dt.datetime | None = None,
    started_at: dt.datetime | None = None,
    finished_at: dt.datetime | None = None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """A full jobs row; terminal states need finished_at, others must not have it."""
    assert (state in TERMINAL) == (finished_at is not None)
    return {
        "id": uuid.uuid4(),
        "tenant": tenant,
        "task": task,
        "state": state,
        "priority": "default",
        "queue": "default",
        "payload": {},
        "result": None,
        "attempts": 1 if started_at is not None else 0,
        "max_attempts": 3,
        "timeout_seconds": 60.0,
        "tags": [],
        "idempotency_key": idempotency_key,
        "worker": "w:1" if state == "running" else None,
        "cancel_requested": state == "cancelled",
        "created_at": created_at,
        "scheduled_at": scheduled_at or created_at,
        "run_after": created_at if state in ("scheduled", "retrying") else None,
        "started_at": started_at,
        "finished_at": finished_at,
        "updated_at": finished_at or started_at or created_at,
    }


def event_rows(row: dict[str, Any], count: int = 2) -> list[dict[str, Any]]:
    """`count` history rows of a job."""
    return [
        {
            "job_id": row["id"],
            "at": row["created_at"],
            "event": f"e{i}",
            "from_state": None,
            "to_state": row["state"],
            "attempt": 0,
            "worker": None,
            "detail": None,
        }
        for i in range(count)
    ]


def insert_jobs(
    sessions: sessionmaker[Session], rows: Sequence[dict[str, Any]], *, events: int = 0
) -> None:
    """Insert job rows (and `events` history rows each) in one transaction."""
    with sessions.begin() as session:
        if rows:
            session.execute(insert(jobs), list(rows))
        if events and rows:
            session.execute(insert(job_events), [e for r in rows for e in event_rows(r, events)])


def forget_rollups(sessions: sessionmaker[Session]) -> None:
    """Remove every rollup and the aggregation watermark (the conftest keeps other tables)."""
    with sessions.begin() as session:
        session.execute(delete(job_rollups))
        session.execute(delete(marks).where(marks.c.name == MARK))
