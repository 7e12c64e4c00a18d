"""Slot releases outbox; the slot token of an in-progress job.

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("slot_token", sa.String(32), nullable=True))
    op.create_table(
        "slot_releases",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("run_id", sa.String(36), nullable=True),
        sa.Column("cause", sa.String(32), nullable=False),
        sa.Column("members", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_slot_releases"),
    )


def downgrade() -> None:
    op.drop_table("slot_releases")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("slot_token")
