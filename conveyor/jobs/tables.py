"""SQLAlchemy tables of the job store; Alembic migrations mirror these."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from conveyor.jobs.states import TERMINAL_STATES, WORKFLOW_STATES, JobState, Priority

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timestamps always in UTC and always timezone-aware, on PostgreSQL and SQLite."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the job store")
        value = value.astimezone(dt.UTC)
        # SQLite keeps text; a fixed naive-UTC form keeps comparisons in SQL correct.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        assert isinstance(value, dt.datetime)
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


JSONType = JSON().with_variant(JSONB(), "postgresql")
EventId = BigInteger().with_variant(Integer(), "sqlite")


def _in(column: str, values: Any) -> str:
    return f"{column} IN ({', '.join(repr(str(v)) for v in sorted(values))})"


def _partial_index(name: str, *columns: str, unique: bool = False, where: str = "") -> Index:
    """An index on `columns` holding only the rows where `where` (default: the last
    column) is not NULL, on PostgreSQL and SQLite alike."""
    predicate = text(f"{where or columns[-1]} IS NOT NULL")
    return Index(name, *columns, unique=unique, postgresql_where=predicate, sqlite_where=predicate)


jobs = Table(
    "jobs",
    metadata,
    Column("id", Uuid(), primary_key=True),
    Column("tenant", String(100), nullable=False),
    Column("task", String(200), nullable=False),
    Column("state", String(16), nullable=False),
    Column("priority", String(8), nullable=False),
    Column("queue", String(64), nullable=False),
    Column("payload", JSONType, nullable=False),
    Column("result", JSONType, nullable=True),
    Column("error_type", String(200), nullable=True),
    Column("error_message", Text, nullable=True),
    Column("error_traceback", Text, nullable=True),
    Column("error_fingerprint", String(64), nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False),
    Column("timeout_seconds", Float, nullable=False),
    Column("progress", JSONType, nullable=True),
    Column("tags", JSONType, nullable=False),
    Column("idempotency_key", String(255), nullable=True),
    Column("request_hash", String(64), nullable=True),
    Column("worker", String(255), nullable=True),
    Column("lease_expires_at", UTCDateTime(), nullable=True),
    # The fencing token of the job's current (or last) run: every claim takes the next
    # one and it never goes back, not even when a retry counts attempts afresh, so a
    # stale run's renewals and outcome writes can never pass for a newer run's.
    Column("lease_token", BigInteger, nullable=False, default=0, server_default=text("0")),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("scheduled_at", UTCDateTime(), nullable=True),
    Column("run_after", UTCDateTime(), nullable=True),
    Column("published_at", UTCDateTime(), nullable=True),
    Column("started_at", UTCDateTime(), nullable=True),
    Column("finished_at", UTCDateTime(), nullable=True),
    Column("updated_at", UTCDateTime(), nullable=False),
    # Set on jobs a schedule created: one job per (schedule, tick), whoever fires it.
    Column("schedule_id", Uuid(), nullable=True),
    Column("schedule_tick", UTCDateTime(), nullable=True),
    # Flow control: the key a task type's limits count by, and, while a job waits for a
    # rate limit, when that limit is expected to have room.
    Column("limit_key", String(200), nullable=True),
    Column("slot_at", UTCDateTime(), nullable=True),
    # Where the job came from: its W3C traceparent and the API request's id.
    Column("traceparent", String(100), nullable=True),
    Column("request_id", String(100), nullable=True),
    # A workflow's step: its workflow, its key, when it runs ("succeeded": after all its
    # parents succeeded; "finished": after all ended), and its parents not yet terminal
    # and ended other than succeeded (kept by the trigger of migration 0008).
    Column("workflow_id", Uuid(), nullable=True),
    Column("step", String(64), nullable=True),
    Column("run_if", String(16), nullable=True),
    Column("parents_left", Integer, nullable=False, default=0, server_default=text("0")),
    Column("parents_failed", Integer, nullable=False, default=0, server_default=text("0")),
    CheckConstraint(_in("state", {s.value for s in JobState}), name="state_known"),
    CheckConstraint(_in("priority", {p.value for p in Priority}), name="priority_known"),
    CheckConstraint(
        f"({_in('state', TERMINAL_STATES)}) = (finished_at IS NOT NULL)",
        name="finished_iff_terminal",
    ),
    CheckConstraint("attempts >= 0 AND attempts <= max_attempts", name="attempts_bounded"),
    CheckConstraint("max_attempts >= 1", name="max_attempts_positive"),
    CheckConstraint("state <> 'running' OR worker IS NOT NULL", name="running_has_worker"),
    CheckConstraint(
        f"NOT ({_in('state', {'scheduled', 'retrying'})}) OR run_after IS NOT NULL",
        name="waiting_has_due_time",
    ),
    # Most jobs have no idempotency key, no schedule, no limit key and, while they are
    # live, no finished_at: partial indexes leave those jobs out, so inserting a job and
    # each of its transitions (a non-HOT update writes every index that covers the row)
    # costs four fewer index entries. Every query that uses them compares the column
    # with `=` or a range, which implies IS NOT NULL.
    _partial_index("uq_jobs_tenant_idempotency_key", "tenant", "idempotency_key", unique=True),
    _partial_index(
        "uq_jobs_schedule_id_schedule_tick", "schedule_id", "schedule_tick", unique=True
    ),
    Index("ix_jobs_tenant_created", "tenant", "created_at", "id"),
    Index("ix_jobs_state_run_after", "state", "run_after"),
    # Aggregation and retention read finished jobs by time; both stay off full scans.
    _partial_index("ix_jobs_finished_at", "finished_at"),
    _partial_index("ix_jobs_task_limit_key_state", "task", "limit_key", "state", where="limit_key"),
    _partial_index("ix_jobs_workflow_id", "workflow_id"),
)

# A workflow: its steps are jobs; the counts of its unfinished and failed steps move in
# the steps' own transitions (the trigger of migration 0008).
workflows = Table(
    "workflows",
    metadata,
    Column("id", Uuid(), primary_key=True),
    Column("tenant", String(100), nullable=False),
    Column("name", String(200), nullable=True),
    Column("state", String(16), nullable=False),
    Column("tags", JSONType, nullable=False),
    Column("steps_total", Integer, nullable=False),
    Column("steps_left", Integer, nullable=False),
    Column("steps_failed", Integer, nullable=False),
    Column("idempotency_key", String(255), nullable=True),
    Column("request_hash", String(64), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("finished_at", UTCDateTime(), nullable=True),
    CheckConstraint(_in("state", WORKFLOW_STATES), name="state_known"),
    Index("ix_workflows_tenant_created", "tenant", "created_at", "id"),
    _partial_index("uq_workflows_tenant_idempotency_key", "tenant", "idempotency_key", unique=True),
)

# The edges of workflows: `job_id` runs after `parent_id`.
job_parents = Table(
    "job_parents",
    metadata,
    Column("parent_id", Uuid(), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("job_id", Uuid(), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Index("ix_job_parents_job_id", "job_id"),
)

job_events = Table(
    "job_events",
    metadata,
    Column("id", EventId, primary_key=True, autoincrement=True),
    Column("job_id", Uuid(), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("at", UTCDateTime(), nullable=False),
    Column("event", String(32), nullable=False),
    Column("from_state", String(16), nullable=True),
    Column("to_state", String(16), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("worker", String(255), nullable=True),
    Column("detail", JSONType, nullable=True),
    Index("ix_job_events_job_id", "job_id", "id"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Uuid(), primary_key=True),
    Column("tenant", String(100), nullable=False),
    Column("prefix", String(16), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("scopes", JSONType, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("revoked_at", UTCDateTime(), nullable=True),
)

# One row: the key that signs console sessions, made by the first API process that needs
# it, so every API host behind a balancer accepts the others' sessions.
console_secrets = Table(
    "console_secrets",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("secret", String(128), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
)

schedules = Table(
    "schedules",
    metadata,
    Column("id", Uuid(), primary_key=True),
    Column("tenant", String(100), nullable=False),
    Column("name", String(100), nullable=False),
    Column("task", String(200), nullable=False),
    Column("payload", JSONType, nullable=False),
    Column("cron", String(200), nullable=True),
    Column("interval_seconds", Float, nullable=True),
    Column("timezone", String(64), nullable=False),
    Column("enabled", Boolean, nullable=False),
    Column("priority", String(8), nullable=True),
    Column("misfire", String(16), nullable=False),
    Column("next_run_at", UTCDateTime(), nullable=True),
    Column("last_run_at", UTCDateTime(), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    CheckConstraint("(cron IS NULL) <> (interval_seconds IS NULL)", name="cron_or_interval"),
    CheckConstraint("interval_seconds IS NULL OR interval_seconds > 0", name="interval_positive"),
    CheckConstraint("misfire IN ('run_once', 'skip')", name="misfire_known"),
    UniqueConstraint("tenant", "name"),
    Index("ix_schedules_due", "enabled", "next_run_at"),
)

# Named leases: the beat leader holds "beat" and renews it; others wait to take it over.
leases = Table(
    "leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(255), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
)

# Watermarks of incremental work, such as how far aggregation has got.
marks = Table(
    "marks",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("at", UTCDateTime(), nullable=False),
)

# Per tenant, task type and minute of finishing: counts, percentiles and histograms.
job_rollups = Table(
    "job_rollups",
    metadata,
    Column("tenant", String(100), primary_key=True),
    Column("task", String(200), primary_key=True),
    Column("minute", UTCDateTime(), primary_key=True),
    Column("counts", JSONType, nullable=False),
    Column("run_p50", Float, nullable=True),
    Column("run_p95", Float, nullable=True),
    Column("run_p99", Float, nullable=True),
    Column("wait_p50", Float, nullable=True),
    Column("wait_p95", Float, nullable=True),
    Column("wait_p99", Float, nullable=True),
    Column("run_histogram", JSONType, nullable=False),
    Column("wait_histogram", JSONType, nullable=False),
    Index("ix_job_rollups_minute", "minute"),
)

# Episodes of a task type's signal (failure rate, run or wait p95) departing from its own
# recent baseline: open while ended_at is null, at most one open per tenant, task and signal.
anomalies = Table(
    "anomalies",
    metadata,
    Column("id", Uuid(), primary_key=True),
    Column("tenant", String(100), nullable=False),
    Column("task", String(200), nullable=False),
    Column("signal", String(32), nullable=False),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("last_seen_at", UTCDateTime(), nullable=False),
    Column("ended_at", UTCDateTime(), nullable=True),
    Column("value", Float, nullable=False),
    Column("baseline", Float, nullable=False),
    Column("score", Float, nullable=False),
    Index(
        "uq_anomalies_open",
        "tenant",
        "task",
        "signal",
        unique=True,
        postgresql_where=text("ended_at IS NULL"),
        sqlite_where=text("ended_at IS NULL"),
    ),
)

# The theoretical arrival time of each rate limit (GCRA) kept in the store, used when
# the broker is not Redis.
rate_limits = Table(
    "rate_limits",
    metadata,
    Column("name", String(300), primary_key=True),
    Column("tat", UTCDateTime(), nullable=False),
)
