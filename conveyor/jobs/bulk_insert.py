"""Recording many new jobs on PostgreSQL in one statement: the rows and their events.

The jobs arrive as one array per column, unnested with their positions; a writable CTE
inserts the jobs, a second one their `created` events, and the outer query returns the
rows in input order. One round trip whatever the batch size, and the database's clock
decides which jobs are still waiting (`scheduled`) without a query of its own.

Only what the database decides comes back (each job's state and the clock's stamp): the
rest of a new row is what the caller gave, so `recorded` builds the jobs from the NewJobs
instead of reading every column (payloads included) back and converting it.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from conveyor.jobs.models import Job, NewJob
from conveyor.jobs.states import JobState

if TYPE_CHECKING:
    from sqlalchemy.orm import Session
    from sqlalchemy.sql.selectable import TextualSelect

# (column, array type) for every value a NewJob brings; the rest are constants below.
_GIVEN = (
    ("id", "uuid[]"),
    ("tenant", "text[]"),
    ("task", "text[]"),
    ("priority", "text[]"),
    ("queue", "text[]"),
    ("payload", "jsonb[]"),
    ("max_attempts", "integer[]"),
    ("timeout_seconds", "double precision[]"),
    ("tags", "jsonb[]"),
    ("idempotency_key", "text[]"),
    ("request_hash", "text[]"),
    ("run_at", "timestamptz[]"),
    ("schedule_id", "uuid[]"),
    ("schedule_tick", "timestamptz[]"),
    ("traceparent", "text[]"),
    ("request_id", "text[]"),
)

_ARRAYS = ",\n        ".join(f"CAST(:{name} AS {kind})" for name, kind in _GIVEN)
_NAMES = ", ".join(name for name, _ in _GIVEN)
# What the database decides of a new row; `recorded` takes them in this order.
_RETURNED = "id, state, created_at"
_RESULT = "created.state, created.created_at"

# The columns a new job's INSERT names, in the order both statements below give them.
_INSERT_INTO = """INSERT INTO jobs (
        id, tenant, task, state, priority, queue, payload, attempts, max_attempts,
        timeout_seconds, tags, idempotency_key, request_hash, cancel_requested,
        created_at, scheduled_at, run_after, updated_at, schedule_id, schedule_tick,
        traceparent, request_id
    )"""

_SQL = f"""
WITH given AS (
    SELECT g.*, clock.stamp,
           (g.run_at IS NOT NULL AND g.run_at > clock.stamp) AS waiting
    FROM unnest(
        {_ARRAYS}
    ) WITH ORDINALITY AS g({_NAMES}, ordinal)
    CROSS JOIN (SELECT COALESCE(CAST(:now AS timestamptz), now()) AS stamp) AS clock
), created AS (
    {_INSERT_INTO}
    SELECT id, tenant, task,
           CASE WHEN waiting THEN 'scheduled' ELSE 'queued' END,
           priority, queue, payload, 0, max_attempts,
           timeout_seconds, tags, idempotency_key, request_hash, false,
           stamp, COALESCE(run_at, stamp), CASE WHEN waiting THEN run_at END, stamp,
           schedule_id, schedule_tick, traceparent, request_id
    FROM given
    ORDER BY ordinal
    RETURNING {_RETURNED}
), logged AS (
    INSERT INTO job_events (job_id, at, event, from_state, to_state, attempt)
    SELECT created.id, created.created_at, 'created', NULL, created.state, 0
    FROM created JOIN given USING (id)
    ORDER BY given.ordinal
)
SELECT {_RESULT} FROM created JOIN given USING (id) ORDER BY given.ordinal
"""


@functools.cache
def _statement() -> TextualSelect:
    """The statement for a session. Times go through the table's type, which refuses naive
    ones as the ORM path does, and the stamp comes back as that type returns it.

    Built on first use: the fast path records with PSYCOPG_SQL and loads no SQLAlchemy.
    """
    from sqlalchemy import bindparam, text
    from sqlalchemy.dialects.postgresql import ARRAY

    from conveyor.jobs.tables import UTCDateTime, jobs

    return (
        text(_SQL)
        .bindparams(
            bindparam("now", type_=UTCDateTime()),
            bindparam("run_at", type_=ARRAY(UTCDateTime())),
            bindparam("schedule_tick", type_=ARRAY(UTCDateTime())),
        )
        .columns(jobs.c.state, jobs.c.created_at)
    )


# The same statement for a plain psycopg connection, for callers that record on a
# connection of their own, prepared once. Its parameters go in binary (`%(name)b`): the
# columns' arrays of ids, numbers and times cost about a third less to send than as text.
PSYCOPG_SQL = re.sub(r"(?<!:):(\w+)", r"%(\1)b", _SQL)


def psycopg_params(new_jobs: Sequence[NewJob]) -> dict[str, Any]:
    """PSYCOPG_SQL's parameters: one list per column, the database's clock."""
    return {**_columns(new_jobs), "now": None}


# One job, the same rows as PSYCOPG_SQL writes, without the arrays: about half the time
# of the statement above for a batch of one (no unnest, no ordinal join to plan or run).
SINGLE_SQL = f"""
WITH clock AS (
    SELECT now() AS stamp,
           (CAST(%(run_at)s AS timestamptz) IS NOT NULL
            AND CAST(%(run_at)s AS timestamptz) > now()) AS waiting
), created AS (
    {_INSERT_INTO}
    SELECT %(id)s, %(tenant)s, %(task)s,
           CASE WHEN waiting THEN 'scheduled' ELSE 'queued' END,
           %(priority)s, %(queue)s, CAST(%(payload)s AS jsonb), 0, %(max_attempts)s,
           %(timeout_seconds)s, CAST(%(tags)s AS jsonb), %(idempotency_key)s,
           %(request_hash)s, false, stamp, COALESCE(CAST(%(run_at)s AS timestamptz), stamp),
           CASE WHEN waiting THEN CAST(%(run_at)s AS timestamptz) END, stamp,
           %(schedule_id)s, %(schedule_tick)s, %(traceparent)s, %(request_id)s
    FROM clock
    RETURNING {_RETURNED}
), logged AS (
    INSERT INTO job_events (job_id, at, event, from_state, to_state, attempt)
    SELECT id, created_at, 'created', NULL, state, 0 FROM created
)
SELECT state, created_at FROM created
"""


def single_params(new: NewJob) -> dict[str, Any]:
    """SINGLE_SQL's parameters."""
    return {name: values[0] for name, values in _columns([new]).items()}


def _columns(new_jobs: Sequence[NewJob]) -> dict[str, list[Any]]:
    """One list per column; JSON goes as text and is cast to jsonb in the statement."""
    return {
        "id": [new.id for new in new_jobs],
        "tenant": [new.tenant for new in new_jobs],
        "task": [new.task for new in new_jobs],
        "priority": [new.priority for new in new_jobs],
        "queue": [new.queue for new in new_jobs],
        "payload": [json.dumps(new.payload) for new in new_jobs],
        "max_attempts": [new.max_attempts for new in new_jobs],
        "timeout_seconds": [float(new.timeout_seconds) for new in new_jobs],
        "tags": [json.dumps(list(new.tags)) for new in new_jobs],
        "idempotency_key": [new.idempotency_key for new in new_jobs],
        "request_hash": [new.request_hash for new in new_jobs],
        "run_at": [new.run_at for new in new_jobs],
        "schedule_id": [new.schedule_id for new in new_jobs],
        "schedule_tick": [new.schedule_tick for new in new_jobs],
        "traceparent": [new.traceparent for new in new_jobs],
        "request_id": [new.request_id for new in new_jobs],
    }


def insert_jobs(
    session: Session, new_jobs: Sequence[NewJob], *, now: dt.datetime | None = None
) -> list[Job]:
    """Insert the jobs and their `created` events in one statement; rows in input order."""
    if not new_jobs:
        return []
    params = {**_columns(new_jobs), "now": now}
    rows = session.execute(_statement(), params).all()
    return recorded(new_jobs, [(row[0], row[1]) for row in rows])


def recorded(new_jobs: Sequence[NewJob], rows: Iterable[tuple[str, dt.datetime]]) -> list[Job]:
    """The jobs as the statements above wrote them, from what was given and each row's
    (state, stamp), the rows in input order."""
    made = []
    for new, (state, stamp) in zip(new_jobs, rows, strict=True):
        job_state = JobState(state)
        made.append(
            Job(
                id=new.id,
                tenant=new.tenant,
                task=new.task,
                state=job_state,
                priority=new.priority,
                queue=new.queue,
                payload=new.payload,
                result=None,
                error_type=None,
                error_message=None,
                error_traceback=None,
                error_fingerprint=None,
                attempts=0,
                max_attempts=new.max_attempts,
                timeout_seconds=float(new.timeout_seconds),
                progress=None,
                tags=list(new.tags),
                idempotency_key=new.idempotency_key,
                request_hash=new.request_hash,
                worker=None,
                lease_expires_at=None,
                cancel_requested=False,
                created_at=stamp,
                scheduled_at=new.run_at or stamp,
                run_after=new.run_at if job_state is JobState.SCHEDULED else None,
                published_at=None,
                started_at=None,
                finished_at=None,
                updated_at=stamp,
                traceparent=new.traceparent,
                request_id=new.request_id,
            )
        )
    return made
