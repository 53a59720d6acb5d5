"""The two transitions every job takes, on a plain psycopg connection (PostgreSQL only).

A claim and a success each cost one statement and one round trip: the conditional
UPDATE and its event run as one data-modifying CTE on an autocommit connection. The
statements here are the only copy: the store runs them through its session on PostgreSQL,
and this module runs them on its own connection, skipping the ORM session around them,
which costs more than the statement on a busy worker.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import uuid
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from conveyor.jobs import bulk_insert
from conveyor.jobs.models import Job, NewJob
from conveyor.jobs.pooling import Pooling
from conveyor.jobs.states import JobState

# Every time here is the database's (`now()`): a worker's own clock never decides a lease.
# `now` is given only where a caller fixes the time (tests of the store).
#
# Each statement finds its job by primary key and checks the state as a filter written
# `(state = ...) IS TRUE`, which no index can answer: a prepared statement's generic plan
# (used after a few executions, saving the planning of every one) could otherwise walk
# the state index through every queued job instead of looking the one id up.
CLAIM_SQL = """
WITH moved AS (
    UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_token = lease_token + 1,
        worker = %(worker)s,
        lease_expires_at = COALESCE(%(now)s::timestamptz, now())
            + make_interval(secs => %(lease_seconds)s::float8),
        started_at = COALESCE(%(now)s::timestamptz, now()),
        updated_at = COALESCE(%(now)s::timestamptz, now()),
        limit_key = COALESCE(%(limit_key)s, limit_key)
    WHERE id = %(id)s AND (state = 'queued') IS TRUE AND attempts < max_attempts
        AND NOT (task = ANY(%(limited)s::text[]))
    RETURNING *
), logged AS (
    INSERT INTO job_events (job_id, at, event, from_state, to_state, attempt, worker)
    SELECT id, updated_at, 'claimed', 'queued', 'running', attempts, %(worker)s FROM moved
)
SELECT * FROM moved
"""

SUCCEED_SQL = """
WITH moved AS (
    UPDATE jobs SET state = 'succeeded', result = %(result)s,
        finished_at = COALESCE(%(now)s::timestamptz, now()),
        lease_expires_at = NULL, updated_at = COALESCE(%(now)s::timestamptz, now())
    WHERE id = %(id)s AND (state = 'running') IS TRUE AND lease_token = %(token)s
        AND worker = %(worker)s
    RETURNING *
), logged AS (
    INSERT INTO job_events (job_id, at, event, from_state, to_state, attempt, worker)
    SELECT id, updated_at, 'succeeded', 'running', 'succeeded', attempts, %(worker)s
    FROM moved
)
SELECT * FROM moved
"""

# Many successes of one worker process in one statement: the rows that still hold their
# lease token move, each with its event; the ids and tokens that moved come back.
SUCCEED_MANY_SQL = """
WITH done AS (
    SELECT * FROM unnest(%(ids)s::uuid[], %(tokens)s::bigint[], %(results)s::jsonb[])
        AS d(id, token, result)
), moved AS (
    UPDATE jobs SET state = 'succeeded', result = done.result,
        finished_at = COALESCE(%(now)s::timestamptz, now()),
        lease_expires_at = NULL, updated_at = COALESCE(%(now)s::timestamptz, now())
    FROM done
    WHERE jobs.id = done.id AND (jobs.state = 'running') IS TRUE AND jobs.lease_token = done.token
        AND jobs.worker = %(worker)s
    RETURNING jobs.id, jobs.lease_token, jobs.attempts, jobs.updated_at
), logged AS (
    INSERT INTO job_events (job_id, at, event, from_state, to_state, attempt, worker)
    SELECT id, updated_at, 'succeeded', 'running', 'succeeded', attempts, %(worker)s
    FROM moved
)
SELECT id, lease_token FROM moved
"""

# One renewal round of a process: the leases of its runs (still running under the token
# it holds), and the stop windows of runs told to stop that are still alive (see
# store.renew_leases and store.extend_stop_windows, which write the same values).
RENEW_SQL = """
WITH renewed AS (
    UPDATE jobs SET lease_expires_at = now() + make_interval(secs => %(lease_seconds)s::float8)
    FROM unnest(%(held_ids)s::uuid[], %(held_tokens)s::bigint[]) AS held(id, token)
    WHERE jobs.id = held.id AND jobs.lease_token = held.token
        AND (jobs.state = 'running') IS TRUE
    RETURNING jobs.id, jobs.lease_token
), stopping AS (
    UPDATE jobs SET lease_expires_at = now() + make_interval(secs => %(lease_seconds)s::float8)
    FROM unnest(%(stop_ids)s::uuid[], %(stop_tokens)s::bigint[]) AS stop(id, token)
    WHERE jobs.id = stop.id AND jobs.lease_token = stop.token
        AND (jobs.state <> 'running') IS TRUE AND jobs.lease_expires_at IS NOT NULL
)
SELECT id, lease_token FROM renewed
"""

# A workflow step's parents that succeeded: their keys and results.
PARENT_RESULTS_SQL = """
SELECT p.step, p.result FROM job_parents e JOIN jobs p ON p.id = e.parent_id
WHERE e.job_id = %(id)s AND (p.state = 'succeeded') IS TRUE
"""

# The marks of publication of many jobs: one array parameter, whatever their number.
MARK_SQL = """
UPDATE jobs SET published_at = now()
WHERE id = ANY(%(ids)s::uuid[]) AND published_at IS NULL
"""

# A running attempt's progress, written only while that attempt holds the job.
PROGRESS_SQL = """
UPDATE jobs SET progress = %(progress)s
WHERE id = %(id)s AND (state = 'running') IS TRUE AND lease_token = %(token)s
"""

# A delivery of a finished job (a duplicate: the relay or the sweep published it again)
# is noted in its history and dropped, as store.record_dropped_delivery does. Jobs that
# are running or waiting are the claimer's: a lapsed lease or a due wait takes a rescue
# or a promotion, in a transaction.
DROP_FINISHED_SQL = """
WITH current AS (
    SELECT id, state, attempts FROM jobs
    WHERE id = %(id)s AND (state IN ('succeeded', 'dead', 'cancelled')) IS TRUE
), logged AS (
    INSERT INTO job_events (job_id, at, event, from_state, to_state, attempt, worker, detail)
    SELECT id, now(), 'delivery_dropped', state, state, attempts, %(worker)s,
        jsonb_build_object('reason', 'job is ' || state)
    FROM current
)
SELECT state FROM current
"""


def claim_params(
    job_id: uuid.UUID,
    *,
    worker: str,
    lease_seconds: float,
    limit_key: str | None = None,
    now: dt.datetime | None = None,
    limited: Sequence[str] = (),
) -> dict[str, Any]:
    """CLAIM_SQL's parameters; jobs of the `limited` task types are left to flow control."""
    return {
        "id": job_id,
        "worker": worker,
        "lease_seconds": float(lease_seconds),
        "limit_key": limit_key,
        "now": now,
        "limited": list(limited),
    }


def succeed_params(
    job_id: uuid.UUID, *, worker: str, token: int, result: Any, now: dt.datetime | None = None
) -> dict[str, Any]:
    """SUCCEED_SQL's parameters."""
    return {"id": job_id, "worker": worker, "token": token, "result": Jsonb(result), "now": now}


# A process's connections, one per kind of statement (and thread), and those whose
# commits do not wait for the disk (see `_connection`).
_CONNECTIONS = ("claims", "finishes", "records", "leases", "marks", "progress")
_NOT_WAITING_FOR_DISK = frozenset({"claims", "leases", "marks", "progress"})


def libpq_url(database_url: str) -> str:
    """The libpq URI of a SQLAlchemy PostgreSQL URL (its `+driver` dropped)."""
    scheme, separator, rest = database_url.partition("://")
    if not separator or scheme.partition("+")[0] != "postgresql":
        raise ValueError(f"not a PostgreSQL URL: {scheme}://...")
    return f"postgresql://{rest}"


class FastPath:
    """One autocommit connection per process (and thread), opened on first use."""

    def __init__(self, database_url: str) -> None:
        self._conninfo = libpq_url(database_url)
        self._local = threading.local()

    def _connection(self, name: str) -> psycopg.Connection[dict[str, Any]]:
        if getattr(self._local, "pid", None) != os.getpid():
            self._local.__dict__.clear()
            self._local.pid = os.getpid()
        conn: psycopg.Connection[dict[str, Any]] | None = getattr(self._local, name, None)
        if conn is None or conn.closed:
            pooled = Pooling.transaction
            conn = psycopg.connect(
                self._conninfo,
                autocommit=True,
                row_factory=dict_row,
                connect_timeout=5,
                # Behind a pooler psycopg must not prepare what it runs often.
                **({"prepare_threshold": None} if pooled else {}),
            )
            # A pooler in transaction mode carries the time zone along with the client;
            # the settings below would stay on a server connection, so none is made.
            conn.execute("SET TIME ZONE 'UTC'")
            if name != "records" and not pooled:
                # Every statement on these connections finds its rows by primary key;
                # a generic plan made while the table was small must not be a scan.
                # (Unprepared, as behind a pooler, each call is planned for its values.)
                conn.execute("SET enable_seqscan = off")
            if name in _NOT_WAITING_FOR_DISK and not pooled:
                # A claim need not wait for the disk: if the server crashes before the
                # WAL is flushed, the job is simply still queued and its message is
                # delivered again. Nor need a renewal: one lost leaves the lease the
                # previous round gave, at least two renewal intervals long, and the next
                # round renews it (or, failing, stops the run before it lapses). A mark
                # of publication lost makes the relay publish the job again, and the
                # extra delivery is dropped at claim. Progress is overwritten by the next
                # report. Finishes and records stay durable.
                conn.execute("SET synchronous_commit = off")
            setattr(self._local, name, conn)
        return conn

    def close(self) -> None:
        """Close this thread's connections; the next call opens new ones."""
        if getattr(self._local, "pid", None) != os.getpid():
            return
        for name in _CONNECTIONS:
            conn = getattr(self._local, name, None)
            if conn is not None:
                conn.close()
                setattr(self._local, name, None)

    def _execute(
        self, name: str, sql: str, params: dict[str, Any], *, prepare: bool | None = True
    ) -> psycopg.Cursor[dict[str, Any]]:
        """Run `sql` on this thread's `name` connection; its rows are in the cursor."""
        if Pooling.transaction:
            prepare = False
        try:
            return self._connection(name).execute(sql, params, prepare=prepare)
        except psycopg.OperationalError:
            # The next call opens a new connection; this one reports the outage.
            setattr(self._local, name, None)
            raise

    def _run(self, name: str, sql: str, params: dict[str, Any]) -> dict[str, Any] | None:
        return self._execute(name, sql, params).fetchone()

    def claim(
        self,
        job_id: uuid.UUID,
        *,
        worker: str,
        lease_seconds: float,
        limited: Sequence[str] = (),
    ) -> Job | None:
        """queued → running, as store.claim, unless the job's task type has limits."""
        params = claim_params(job_id, worker=worker, lease_seconds=lease_seconds, limited=limited)
        row = self._run("claims", CLAIM_SQL, params)
        return None if row is None else Job.from_row(row)  # type: ignore[arg-type]

    def drop_finished(self, job_id: uuid.UUID, *, worker: str) -> JobState | None:
        """Note and drop a delivery of a finished job: its state, or None when the job is
        not finished (or does not exist)."""
        row = self._run("claims", DROP_FINISHED_SQL, {"id": job_id, "worker": worker})
        return None if row is None else JobState(row["state"])

    def record(self, new_jobs: Sequence[NewJob]) -> list[Job]:
        """Insert new jobs and their events in one durable autocommit statement, in order."""
        if not new_jobs:
            return []
        if len(new_jobs) == 1:
            sql, params = bulk_insert.SINGLE_SQL, bulk_insert.single_params(new_jobs[0])
        else:
            sql, params = bulk_insert.PSYCOPG_SQL, bulk_insert.psycopg_params(new_jobs)
        cursor = self._execute("records", sql, params)
        rows = [(row["state"], row["created_at"]) for row in cursor.fetchall()]
        return bulk_insert.recorded(new_jobs, rows)

    def succeed_many(
        self, worker: str, runs: Sequence[tuple[uuid.UUID, int, Any]]
    ) -> set[tuple[uuid.UUID, int]]:
        """running → succeeded for many (job, token, result) at once; the runs that moved."""
        params = {
            "ids": [job_id for job_id, _, _ in runs],
            "tokens": [token for _, token, _ in runs],
            "results": [Jsonb(result) for _, _, result in runs],
            "worker": worker,
            "now": None,
        }
        cursor = self._execute("finishes", SUCCEED_MANY_SQL, params, prepare=None)
        return {(row["id"], row["lease_token"]) for row in cursor.fetchall()}

    def set_progress(self, job_id: uuid.UUID, token: int, progress: Any) -> None:
        """Store a running attempt's progress (PROGRESS_SQL); nothing once it lost the job."""
        params = {"id": job_id, "token": token, "progress": Jsonb(progress)}
        self._execute("progress", PROGRESS_SQL, params)

    def parent_results(self, job_id: uuid.UUID) -> dict[str, Any]:
        """A workflow step's parents that succeeded: {key: result} (PARENT_RESULTS_SQL)."""
        cursor = self._execute("progress", PARENT_RESULTS_SQL, {"id": job_id})
        return {row["step"]: row["result"] for row in cursor.fetchall()}

    def mark_published(self, job_ids: Sequence[uuid.UUID]) -> None:
        """Stamp `published_at` on those of the jobs that have none (MARK_SQL)."""
        # Planned for each call, not prepared: a generic plan made while the arrays were
        # a handful of ids took 0.3-0.8 ms a row once they were a batch's 1,000 (a mark
        # of 1,000 in 200-900 ms, against 30 ms planned for its array).
        self._execute("marks", MARK_SQL, {"ids": list(job_ids)}, prepare=False)

    def renew(
        self,
        held: Sequence[tuple[uuid.UUID, int]],
        stopping: Sequence[tuple[uuid.UUID, int]],
        *,
        lease_seconds: float,
    ) -> set[tuple[uuid.UUID, int]]:
        """Renew the leases of `held` runs and the stop windows of `stopping` ones, in one
        statement; the held runs still held (see RENEW_SQL)."""
        params = {
            "held_ids": [job_id for job_id, _ in held],
            "held_tokens": [token for _, token in held],
            "stop_ids": [job_id for job_id, _ in stopping],
            "stop_tokens": [token for _, token in stopping],
            "lease_seconds": float(lease_seconds),
        }
        # Planned for each round, as the marks are: its arrays' length varies widely.
        cursor = self._execute("leases", RENEW_SQL, params, prepare=False)
        return {(row["id"], int(row["lease_token"])) for row in cursor.fetchall()}

    def succeed(self, job_id: uuid.UUID, *, worker: str, token: int, result: Any) -> bool:
        """running → succeeded, as store.succeed; False when the run lost its lease."""
        row = self._run(
            "finishes",
            SUCCEED_SQL,
            succeed_params(job_id, worker=worker, token=token, result=result),
        )
        return row is not None
