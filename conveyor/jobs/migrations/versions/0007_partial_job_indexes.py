"""partial job indexes: leave out the rows whose indexed column is NULL

Revision ID: 0007
Revises: 0006

Most jobs carry no idempotency key, no schedule tick and no limit key, and a live job has
no finished_at. A B-tree keeps an entry for NULL like for any value, so each insert and
each non-HOT transition wrote four entries nobody can look up. The unique constraints
become partial unique indexes (NULLs never conflicted, so what is allowed is unchanged).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# name, columns, the column that must not be NULL, unique
_INDEXES: tuple[tuple[str, list[str], str, bool], ...] = (
    ("uq_jobs_tenant_idempotency_key", ["tenant", "idempotency_key"], "idempotency_key", True),
    ("uq_jobs_schedule_id_schedule_tick", ["schedule_id", "schedule_tick"], "schedule_tick", True),
    ("ix_jobs_finished_at", ["finished_at"], "finished_at", False),
    ("ix_jobs_task_limit_key_state", ["task", "limit_key", "state"], "limit_key", False),
)


def _create(name: str, columns: list[str], where: str | None, unique: bool) -> None:
    predicate = None if where is None else sa.text(f"{where} IS NOT NULL")
    op.create_index(
        name,
        "jobs",
        columns,
        unique=unique,
        postgresql_where=predicate,
        sqlite_where=predicate,
    )


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("jobs") as batch:
        for name, _columns, _where, unique in _INDEXES:
            if unique:
                batch.drop_constraint(name, type_="unique")
    for name, columns, where, unique in _INDEXES:
        if not unique:
            op.drop_index(name, table_name="jobs")
        _create(name, columns, where, unique)


def downgrade() -> None:
    """Revert this revision."""
    for name, columns, _where, unique in _INDEXES:
        op.drop_index(name, table_name="jobs")
        if not unique:
            _create(name, columns, None, False)
    with op.batch_alter_table("jobs") as batch:
        for name, columns, _where, unique in _INDEXES:
            if unique:
                batch.create_unique_constraint(name, columns)
