"""console_secrets: the key that signs the operator console's session cookies

Revision ID: 0009
Revises: 0008

One row, written by the first API process that signs a session; a setting
(CONVEYOR_CONSOLE_SECRET) takes its place where operators prefer to hold it themselves.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "console_secrets",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("secret", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_table("console_secrets")
