"""flow control: limit keys, reserved slots, rate limits kept in the store

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "rate_limits",
        sa.Column("name", sa.String(length=300), nullable=False),
        sa.Column("tat", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_rate_limits")),
    )
    # Nullable additions only: the previous release keeps writing jobs while this runs.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("limit_key", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("slot_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_jobs_task_limit_key_state", "jobs", ["task", "limit_key", "state"], unique=False
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_index("ix_jobs_task_limit_key_state", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("slot_at")
        batch.drop_column("limit_key")
    op.drop_table("rate_limits")
