"""job origin: the trace and the API request a job came from

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    # Nullable additions only: the previous release keeps writing jobs while this runs.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("traceparent", sa.String(length=100), nullable=True))
        batch.add_column(sa.Column("request_id", sa.String(length=100), nullable=True))


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("request_id")
        batch.drop_column("traceparent")
