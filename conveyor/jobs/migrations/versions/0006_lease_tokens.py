"""lease tokens: a fencing token per run that is never reused

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    # A constant default: PostgreSQL adds the column without rewriting the table, and the
    # previous release's inserts, which do not name it, still succeed.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("lease_token", sa.BigInteger(), nullable=False, server_default=sa.text("0"))
        )


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("lease_token")
