"""The tables. Imported by the store and by the migrations, nothing else.

Times are stored as UTC. ``runs.worker_id`` and ``runs.lock_ts`` are the lock
fields (who holds the lease, since when); ``runs.last_heartbeat_at`` is the
liveness signal, kept apart from the lock as the seed's fix did.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    DDL,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Sequence,
    String,
    Table,
    Text,
    event,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ColumnElement
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in Python on every engine (SQLite keeps naive UTC text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


RUN_NUMBER_SEQUENCE = "runs_number_seq"
# PostgreSQL's source of run numbers; SQLite has no sequences (see NextRunNumber).
run_number_sequence = Sequence(RUN_NUMBER_SEQUENCE, metadata=metadata)


class NextRunNumber(ColumnElement[int]):
    """The next run number, computed by the database inside the INSERT.

    PostgreSQL draws it from ``runs_number_seq``. SQLite takes one above the
    largest number in the table: the statement runs under SQLite's single
    write lock, so two inserts never see the same largest number, and runs are
    never deleted, so a number is never handed out twice.
    """

    type = BigInteger()
    inherit_cache = True


@compiles(NextRunNumber, "postgresql")
def _next_number_postgresql(element: NextRunNumber, compiler: SQLCompiler, **kw: Any) -> str:
    return f"nextval('{RUN_NUMBER_SEQUENCE}')"


@compiles(NextRunNumber)
def _next_number_sqlite(element: NextRunNumber, compiler: SQLCompiler, **kw: Any) -> str:
    return "(SELECT coalesce(max(number), 0) + 1 FROM runs)"


ACTIVE_STATES_SQL = "state IN ('PENDING', 'RUNNING')"
RUNNING_SQL = "state = 'RUNNING'"
CANCELLING_SQL = "state = 'RUNNING' AND cancel_requested"

runs = Table(
    "runs",
    metadata,
    Column("id", String(36), primary_key=True),
    # Short, unique and increasing: how people and the monolith's URLs name a run.
    Column("number", BigInteger, nullable=False, default=NextRunNumber()),
    Column("tenant_id", String(128), nullable=False),
    Column("request_id", String(128), nullable=False),
    Column("state", String(16), nullable=False),
    Column("stop_reason", String(64)),
    Column("error", Text),
    Column("cancel_requested", Boolean, nullable=False, server_default=text("false")),
    Column("cancel_reason", Text),
    Column("cancel_requested_at", UtcDateTime),
    Column("worker_id", String(128)),
    Column("lease_epoch", BigInteger, nullable=False, server_default=text("0")),
    Column("lock_ts", UtcDateTime),
    Column("last_heartbeat_at", UtcDateTime),
    Column("created_at", UtcDateTime, nullable=False),
    Column("started_at", UtcDateTime),
    Column("ended_at", UtcDateTime),
    Column("updated_at", UtcDateTime, nullable=False),
    Index("uq_runs_tenant_id_request_id", "tenant_id", "request_id", unique=True),
    Index("uq_runs_number", "number", unique=True),
    # The UI's "active queue": at most one pending or running run per tenant,
    # held by the database so that no check-then-insert race can break it.
    Index(
        "uq_runs_one_active_per_tenant",
        "tenant_id",
        unique=True,
        postgresql_where=text(ACTIVE_STATES_SQL),
        sqlite_where=text(ACTIVE_STATES_SQL),
    ),
    # The reaper's reads: partial, so they hold the running runs only, and a
    # pass reads the silent ones, however long the history grows.
    Index(
        "ix_runs_running_last_heartbeat_at",
        "last_heartbeat_at",
        postgresql_where=text(RUNNING_SQL),
        sqlite_where=text(RUNNING_SQL),
    ),
    Index(
        "ix_runs_running_cancel_requested_at",
        "cancel_requested_at",
        postgresql_where=text(CANCELLING_SQL),
        sqlite_where=text(CANCELLING_SQL),
    ),
    Index("ix_runs_state_created_at", "state", "created_at"),
    Index("ix_runs_tenant_id_created_at", "tenant_id", "created_at"),
    Index("ix_runs_worker_id_state", "worker_id", "state"),
)

# On PostgreSQL the column's own default draws from the sequence too, so rows
# inserted by plain SQL (bulk loads, an operator's psql) are numbered as well.
RUN_NUMBER_DEFAULT_SQL = (
    f"ALTER TABLE runs ALTER COLUMN number SET DEFAULT nextval('{RUN_NUMBER_SEQUENCE}')"
)
event.listen(runs, "after_create", DDL(RUN_NUMBER_DEFAULT_SQL).execute_if(dialect="postgresql"))

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("run_id", String(36), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("tenant_id", String(128), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("external_id", String(256), nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("state", String(16), nullable=False),
    # Why an unfinished job failed when its run ended (the run's reason, or
    # WORKER_LOST for a job that was in progress).
    Column("stop_reason", String(64)),
    Column("error", Text),
    # The lease epoch that took the job; a late result must come from it.
    Column("lease_epoch", BigInteger),
    # Names the concurrency slot the job holds while in progress (with run,
    # epoch and job id), so that releasing it can never free another grant.
    Column("slot_token", String(32)),
    Column("late", Boolean, nullable=False, server_default=text("false")),
    Column("created_at", UtcDateTime, nullable=False),
    Column("started_at", UtcDateTime),
    Column("ended_at", UtcDateTime),
    Index("uq_jobs_run_id_external_id", "run_id", "external_id", unique=True),
    Index("ix_jobs_run_id_state_seq", "run_id", "state", "seq"),
    Index("ix_jobs_tenant_id_state", "tenant_id", "state"),
)

audit_events = Table(
    "audit_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", UtcDateTime, nullable=False),
    # The seed's tags: STALE_DETECTION, FORCE_CANCEL, SECURITY; and RUN_ENDED.
    Column("tag", String(32), nullable=False),
    Column("action", String(64), nullable=False),
    Column("tenant_id", String(128)),
    Column("run_id", String(36)),
    Column("actor", String(256)),
    Column("detail", Text, nullable=False, server_default=text("'{}'")),
    Index("ix_audit_events_run_id", "run_id"),
    Index("ix_audit_events_tag_created_at", "tag", "created_at"),
)

# The slot-release outbox: written in the transaction that moves jobs out of
# progress, applied to the slot store (Redis) by a relay after commit, and
# deleted once applied. ``members`` are the exact slot names, one per line.
slot_releases = Table(
    "slot_releases",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("tenant_id", String(128), nullable=False),
    Column("run_id", String(36)),
    Column("cause", String(32), nullable=False),
    Column("members", Text, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text),
    # Which relay is applying the row, and until when its claim holds: two
    # replicas never apply one row at once, and a claim dies with its holder.
    Column("claimed_by", String(128)),
    Column("claimed_until", UtcDateTime),
)

# Leases on once-per-interval jobs (the slot reconciler): one row per job,
# naming the replica whose turn it is until ``expires_at`` (database time).
leases = Table(
    "leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(128), nullable=False),
    Column("expires_at", UtcDateTime, nullable=False),
)
