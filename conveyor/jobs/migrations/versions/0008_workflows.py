"""workflows: steps that run after others, released inside their parents' transitions

Revision ID: 0008
Revises: 0007

A workflow is a row of its own and a set of jobs (its steps) with edges between them.
A step with parents waits in the state `pending`; `parents_left` counts its parents not
yet terminal and `parents_failed` those that ended other than `succeeded`. A trigger on
the jobs table runs inside every statement that moves a step into or out of a terminal
state, whichever path wrote it (the worker's fast path, a store transition, a cancel, a
retry), so a step is released, or cancelled as `upstream_failed`, in its last parent's
own transaction, and the workflow's counts of unfinished and failed steps move with it.
A step moved back out of a terminal state (a retry) undoes what it did: the children it
cancelled become `pending` again (and theirs, by the same trigger), the workflow
`running`.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TERMINAL = "('cancelled', 'dead', 'succeeded')"
_STATES_BEFORE = "('cancelled', 'dead', 'queued', 'retrying', 'running', 'scheduled', 'succeeded')"
_STATES = (
    "('cancelled', 'dead', 'pending', 'queued', 'retrying', 'running', 'scheduled', 'succeeded')"
)
_WORKFLOW_STATES = "('cancelled', 'failed', 'running', 'succeeded')"

# The workflow's state once `left` steps are unfinished and `failed` did not succeed.
_WORKFLOW_AFTER = """CASE WHEN state = 'cancelled' THEN 'cancelled'
                             WHEN {left} > 0 THEN 'running'
                             WHEN {failed} > 0 THEN 'failed'
                             ELSE 'succeeded' END"""

_PG_FUNCTION = f"""
CREATE FUNCTION conveyor_step_moved() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    failed integer;
    stamp timestamptz := now();
BEGIN
    IF (NEW.state IN {_TERMINAL}) = (OLD.state IN {_TERMINAL}) THEN
        RETURN NULL;
    END IF;
    -- The children, locked in id order: two parents finishing at once cannot deadlock.
    PERFORM 1 FROM jobs c JOIN job_parents e ON e.job_id = c.id
        WHERE e.parent_id = NEW.id ORDER BY c.id FOR UPDATE OF c;
    IF NEW.state IN {_TERMINAL} THEN
        failed := CASE WHEN NEW.state = 'succeeded' THEN 0 ELSE 1 END;
        UPDATE jobs c SET parents_left = c.parents_left - 1,
                          parents_failed = c.parents_failed + failed
            FROM job_parents e WHERE e.parent_id = NEW.id AND c.id = e.job_id;
        WITH moved AS (
            UPDATE jobs c SET state = 'queued', updated_at = stamp, published_at = NULL
                FROM job_parents e
                WHERE e.parent_id = NEW.id AND c.id = e.job_id AND c.state = 'pending'
                    AND c.parents_left = 0 AND (c.run_if = 'finished' OR c.parents_failed = 0)
                RETURNING c.id, c.attempts
        )
        INSERT INTO job_events (job_id, at, event, from_state, to_state, attempt, detail)
            SELECT id, stamp, 'released', 'pending', 'queued', attempts,
                   jsonb_build_object('after', NEW.step)
            FROM moved;
        WITH moved AS (
            UPDATE jobs c SET state = 'cancelled', updated_at = stamp, finished_at = stamp,
                    error_type = 'upstream_failed',
                    error_message = 'step ' || NEW.step || ' ended ' || NEW.state
                FROM job_parents e
                WHERE e.parent_id = NEW.id AND c.id = e.job_id AND c.state = 'pending'
                    AND c.run_if = 'succeeded' AND c.parents_failed > 0
                RETURNING c.id, c.attempts
        )
        INSERT INTO job_events (job_id, at, event, from_state, to_state, attempt, detail)
            SELECT id, stamp, 'upstream_failed', 'pending', 'cancelled', attempts,
                   jsonb_build_object('after', NEW.step)
            FROM moved;
        UPDATE workflows SET steps_left = steps_left - 1,
                steps_failed = steps_failed + failed, updated_at = stamp,
                state = {_WORKFLOW_AFTER.format(left="steps_left - 1", failed="steps_failed + failed")},
                finished_at = CASE WHEN steps_left - 1 > 0 THEN NULL ELSE stamp END
            WHERE id = NEW.workflow_id;
    ELSE
        failed := CASE WHEN OLD.state = 'succeeded' THEN 0 ELSE 1 END;
        UPDATE jobs c SET parents_left = c.parents_left + 1,
                          parents_failed = c.parents_failed - failed
            FROM job_parents e WHERE e.parent_id = NEW.id AND c.id = e.job_id;
        WITH moved AS (
            UPDATE jobs c SET state = 'pending', updated_at = stamp, finished_at = NULL,
                    error_type = NULL, error_message = NULL
                FROM job_parents e
                WHERE e.parent_id = NEW.id AND c.id = e.job_id AND c.state = 'cancelled'
                    AND c.error_type = 'upstream_failed'
                RETURNING c.id, c.attempts
        )
        INSERT INTO job_events (job_id, at, event, from_state, to_state, attempt, detail)
            SELECT id, stamp, 'resumed', 'cancelled', 'pending', attempts,
                   jsonb_build_object('after', NEW.step)
            FROM moved;
        UPDATE workflows SET steps_left = steps_left + 1,
                steps_failed = steps_failed - failed, updated_at = stamp,
                state = 'running', finished_at = NULL
            WHERE id = NEW.workflow_id;
    END IF;
    RETURN NULL;
END
$$
"""

_PG_TRIGGER = """
CREATE TRIGGER conveyor_step_moved AFTER UPDATE OF state ON jobs
    FOR EACH ROW WHEN (NEW.workflow_id IS NOT NULL AND NEW.state IS DISTINCT FROM OLD.state)
    EXECUTE FUNCTION conveyor_step_moved()
"""

# SQLite: the same statements as two triggers (no RETURNING in a trigger: each event is
# written from the rows about to move, just before they move). Recursion (a cancelled
# child cancelling its own children) needs PRAGMA recursive_triggers, set on connect.
_SQLITE_CHILDREN = "id IN (SELECT job_id FROM job_parents WHERE parent_id = NEW.id)"
_SQLITE_FINISHED = f"""
CREATE TRIGGER conveyor_step_finished AFTER UPDATE OF state ON jobs
WHEN NEW.workflow_id IS NOT NULL AND NEW.state IN {_TERMINAL}
    AND OLD.state NOT IN {_TERMINAL}
BEGIN
    UPDATE jobs SET parents_left = parents_left - 1,
                    parents_failed = parents_failed + (NEW.state <> 'succeeded')
        WHERE {_SQLITE_CHILDREN};
    INSERT INTO job_events (job_id, at, event, from_state, to_state, attempt, detail)
        SELECT id, NEW.updated_at, 'released', 'pending', 'queued', attempts,
               json_object('after', NEW.step)
        FROM jobs WHERE {_SQLITE_CHILDREN} AND state = 'pending' AND parents_left = 0
            AND (run_if = 'finished' OR parents_failed = 0);
    UPDATE jobs SET state = 'queued', updated_at = NEW.updated_at, published_at = NULL
        WHERE {_SQLITE_CHILDREN} AND state = 'pending' AND parents_left = 0
            AND (run_if = 'finished' OR parents_failed = 0);
    INSERT INTO job_events (job_id, at, event, from_state, to_state, attempt, detail)
        SELECT id, NEW.updated_at, 'upstream_failed', 'pending', 'cancelled', attempts,
               json_object('after', NEW.step)
        FROM jobs WHERE {_SQLITE_CHILDREN} AND state = 'pending'
            AND run_if = 'succeeded' AND parents_failed > 0;
    UPDATE jobs SET state = 'cancelled', updated_at = NEW.updated_at,
            finished_at = NEW.updated_at, error_type = 'upstream_failed',
            error_message = 'step ' || NEW.step || ' ended ' || NEW.state
        WHERE {_SQLITE_CHILDREN} AND state = 'pending'
            AND run_if = 'succeeded' AND parents_failed > 0;
    UPDATE workflows SET steps_left = steps_left - 1,
            steps_failed = steps_failed + (NEW.state <> 'succeeded'),
            updated_at = NEW.updated_at,
            state = {_WORKFLOW_AFTER.format(left="steps_left - 1", failed="steps_failed + (NEW.state <> 'succeeded')")},
            finished_at = CASE WHEN steps_left - 1 > 0 THEN NULL ELSE NEW.updated_at END
        WHERE id = NEW.workflow_id;
END
"""
_SQLITE_REOPENED = f"""
CREATE TRIGGER conveyor_step_reopened AFTER UPDATE OF state ON jobs
WHEN NEW.workflow_id IS NOT NULL AND OLD.state IN {_TERMINAL}
    AND NEW.state NOT IN {_TERMINAL}
BEGIN
    UPDATE jobs SET parents_left = parents_left + 1,
                    parents_failed = parents_failed - (OLD.state <> 'succeeded')
        WHERE {_SQLITE_CHILDREN};
    INSERT INTO job_events (job_id, at, event, from_state, to_state, attempt, detail)
        SELECT id, NEW.updated_at, 'resumed', 'cancelled', 'pending', attempts,
               json_object('after', NEW.step)
        FROM jobs WHERE {_SQLITE_CHILDREN} AND state = 'cancelled'
            AND error_type = 'upstream_failed';
    UPDATE jobs SET state = 'pending', updated_at = NEW.updated_at, finished_at = NULL,
            error_type = NULL, error_message = NULL
        WHERE {_SQLITE_CHILDREN} AND state = 'cancelled' AND error_type = 'upstream_failed';
    UPDATE workflows SET steps_left = steps_left + 1,
            steps_failed = steps_failed - (OLD.state <> 'succeeded'),
            updated_at = NEW.updated_at, state = 'running', finished_at = NULL
        WHERE id = NEW.workflow_id;
END
"""


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "workflows",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("tenant", sa.String(100), nullable=False),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column(
            "tags",
            sa.JSON().with_variant(sa.dialects.postgresql.JSONB(), "postgresql"),
            nullable=False,
        ),
        sa.Column("steps_total", sa.Integer(), nullable=False),
        sa.Column("steps_left", sa.Integer(), nullable=False),
        sa.Column("steps_failed", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("request_hash", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(f"state IN {_WORKFLOW_STATES}", name="state_known"),
    )
    op.create_index("ix_workflows_tenant_created", "workflows", ["tenant", "created_at", "id"])
    where = sa.text("idempotency_key IS NOT NULL")
    op.create_index(
        "uq_workflows_tenant_idempotency_key",
        "workflows",
        ["tenant", "idempotency_key"],
        unique=True,
        postgresql_where=where,
        sqlite_where=where,
    )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("workflow_id", sa.Uuid(), nullable=True))
        batch.add_column(sa.Column("step", sa.String(64), nullable=True))
        batch.add_column(sa.Column("run_if", sa.String(16), nullable=True))
        batch.add_column(
            sa.Column("parents_left", sa.Integer(), nullable=False, server_default=sa.text("0"))
        )
        batch.add_column(
            sa.Column("parents_failed", sa.Integer(), nullable=False, server_default=sa.text("0"))
        )
        batch.drop_constraint("state_known", type_="check")
        batch.create_check_constraint("state_known", sa.text(f"state IN {_STATES}"))
    where = sa.text("workflow_id IS NOT NULL")
    op.create_index(
        "ix_jobs_workflow_id", "jobs", ["workflow_id"], postgresql_where=where, sqlite_where=where
    )
    op.create_table(
        "job_parents",
        sa.Column(
            "parent_id", sa.Uuid(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column(
            "job_id", sa.Uuid(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.PrimaryKeyConstraint("parent_id", "job_id", name="pk_job_parents"),
    )
    op.create_index("ix_job_parents_job_id", "job_parents", ["job_id"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_PG_FUNCTION)
        op.execute(_PG_TRIGGER)
    else:
        op.execute(_SQLITE_FINISHED)
        op.execute(_SQLITE_REOPENED)


def downgrade() -> None:
    """Revert this revision."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER conveyor_step_moved ON jobs")
        op.execute("DROP FUNCTION conveyor_step_moved()")
    else:
        op.execute("DROP TRIGGER conveyor_step_finished")
        op.execute("DROP TRIGGER conveyor_step_reopened")
    op.drop_table("job_parents")
    op.drop_index("ix_jobs_workflow_id", table_name="jobs")
    op.execute("DELETE FROM jobs WHERE state = 'pending'")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("state_known", type_="check")
        batch.create_check_constraint("state_known", sa.text(f"state IN {_STATES_BEFORE}"))
        for column in ("parents_failed", "parents_left", "run_if", "step", "workflow_id"):
            batch.drop_column(column)
    op.drop_table("workflows")
