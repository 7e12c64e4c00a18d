"""Initial schema: runs, jobs and audit_events.

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ACTIVE_STATES_SQL = "state IN ('PENDING', 'RUNNING')"


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("stop_reason", sa.String(64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column(
            "cancel_requested", sa.Boolean(), server_default=sa.text("false"), nullable=False
        ),
        sa.Column("cancel_reason", sa.Text(), nullable=True),
        sa.Column("cancel_requested_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("worker_id", sa.String(128), nullable=True),
        sa.Column("lease_epoch", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("lock_ts", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_runs"),
    )
    op.create_index(
        "uq_runs_tenant_id_request_id", "runs", ["tenant_id", "request_id"], unique=True
    )
    # At most one pending or running run per tenant.
    op.create_index(
        "uq_runs_one_active_per_tenant",
        "runs",
        ["tenant_id"],
        unique=True,
        postgresql_where=sa.text(ACTIVE_STATES_SQL),
        sqlite_where=sa.text(ACTIVE_STATES_SQL),
    )
    op.create_index("ix_runs_state_last_heartbeat_at", "runs", ["state", "last_heartbeat_at"])
    op.create_index("ix_runs_state_created_at", "runs", ["state", "created_at"])
    op.create_index("ix_runs_tenant_id_created_at", "runs", ["tenant_id", "created_at"])
    op.create_index("ix_runs_worker_id_state", "runs", ["worker_id", "state"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("external_id", sa.String(256), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("stop_reason", sa.String(64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("lease_epoch", sa.BigInteger(), nullable=True),
        sa.Column("late", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name="fk_jobs_run_id_runs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
    )
    op.create_index("uq_jobs_run_id_external_id", "jobs", ["run_id", "external_id"], unique=True)
    op.create_index("ix_jobs_run_id_state_seq", "jobs", ["run_id", "state", "seq"])
    op.create_index("ix_jobs_tenant_id_state", "jobs", ["tenant_id", "state"])

    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tag", sa.String(32), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("tenant_id", sa.String(128), nullable=True),
        sa.Column("run_id", sa.String(36), nullable=True),
        sa.Column("actor", sa.String(256), nullable=True),
        sa.Column("detail", sa.Text(), server_default=sa.text("'{}'"), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_events"),
    )
    op.create_index("ix_audit_events_run_id", "audit_events", ["run_id"])
    op.create_index("ix_audit_events_tag_created_at", "audit_events", ["tag", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_audit_events_tag_created_at", table_name="audit_events")
    op.drop_index("ix_audit_events_run_id", table_name="audit_events")
    op.drop_table("audit_events")

    op.drop_index("ix_jobs_tenant_id_state", table_name="jobs")
    op.drop_index("ix_jobs_run_id_state_seq", table_name="jobs")
    op.drop_index("uq_jobs_run_id_external_id", table_name="jobs")
    op.drop_table("jobs")

    op.drop_index("ix_runs_worker_id_state", table_name="runs")
    op.drop_index("ix_runs_tenant_id_created_at", table_name="runs")
    op.drop_index("ix_runs_state_created_at", table_name="runs")
    op.drop_index("ix_runs_state_last_heartbeat_at", table_name="runs")
    op.drop_index(
        "uq_runs_one_active_per_tenant",
        table_name="runs",
        postgresql_where=sa.text(ACTIVE_STATES_SQL),
        sqlite_where=sa.text(ACTIVE_STATES_SQL),
    )
    op.drop_index("uq_runs_tenant_id_request_id", table_name="runs")
    op.drop_table("runs")
