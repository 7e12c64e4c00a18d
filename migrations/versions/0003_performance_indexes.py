"""Partial indexes that keep the reaper's reads to the running runs.

The reaper looks for running runs that went silent and for running runs
whose cancel request was never acknowledged. Partial indexes on those
columns hold the running runs only, so a pass reads what it ends, however
long the history grows. They replace the (state, last_heartbeat_at) index.

CREATE INDEX locks writes to the table while it builds; on a large table,
run this revision when a short pause of writes is acceptable.

Revision ID: 0003
Revises: 0001
Create Date: 2025-01-03 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RUNNING_SQL = "state = 'RUNNING'"
CANCELLING_SQL = "state = 'RUNNING' AND cancel_requested"


def upgrade() -> None:
    op.create_index(
        "ix_runs_running_last_heartbeat_at",
        "runs",
        ["last_heartbeat_at"],
        postgresql_where=sa.text(RUNNING_SQL),
        sqlite_where=sa.text(RUNNING_SQL),
    )
    op.create_index(
        "ix_runs_running_cancel_requested_at",
        "runs",
        ["cancel_requested_at"],
        postgresql_where=sa.text(CANCELLING_SQL),
        sqlite_where=sa.text(CANCELLING_SQL),
    )
    op.drop_index("ix_runs_state_last_heartbeat_at", table_name="runs")


def downgrade() -> None:
    op.create_index("ix_runs_state_last_heartbeat_at", "runs", ["state", "last_heartbeat_at"])
    op.drop_index("ix_runs_running_cancel_requested_at", table_name="runs")
    op.drop_index("ix_runs_running_last_heartbeat_at", table_name="runs")
