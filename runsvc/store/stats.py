"""Read-only figures about runs for the metrics exporter, computed at scrape time.

Every query here is bounded by an index: the per-state count is an
index-only scan of ``ix_runs_state_created_at``; everything about live runs
reads only PENDING and RUNNING rows, of which there is at most one per
tenant (``uq_runs_one_active_per_tenant``), through the state-leading indexes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Connection, Float, and_, case, cast, func, select

from runsvc.domain import ACTIVE_STATES, RunState
from runsvc.store.dialects import dialect
from runsvc.store.runs import last_sign_of_life
from runsvc.store.schema import runs

OTHER_TENANTS = "_other"


def _utc(value: datetime | str) -> datetime:
    """A time computed by the database (min(), coalesce()), which SQLite returns as text
    and without its zone: aware UTC on every engine."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


@dataclass(frozen=True)
class LiveRuns:
    """What the exporter shows about running runs and their heartbeats."""

    running: int = 0
    stale: int = 0
    oldest_sign_of_life: datetime | None = None
    age_sum_seconds: float = 0.0
    # upper bound in seconds -> running runs whose last sign of life is at most that old
    age_buckets: dict[float, int] = field(default_factory=dict)
    locked_without_heartbeat: int = 0
    cancel_overdue: int = 0


def runs_by_state(conn: Connection) -> dict[str, int]:
    """How many runs are in each state (every state present, zero when none)."""
    counts = {state.value: 0 for state in RunState}
    for state, count in conn.execute(select(runs.c.state, func.count()).group_by(runs.c.state)):
        counts[state] = count
    return counts


def live_runs(
    conn: Connection,
    *,
    now: datetime,
    stale_after: timedelta,
    cancel_grace: timedelta,
    bucket_bounds: Sequence[float],
) -> LiveRuns:
    """One aggregate over the PENDING and RUNNING rows, however many runs have ended."""
    running = runs.c.state == RunState.RUNNING.value

    def count_if(*conditions: ColumnElement[bool]) -> ColumnElement[int]:
        return func.coalesce(func.sum(case((and_(running, *conditions), 1), else_=0)), 0)

    bounds = sorted(bucket_bounds)
    columns: list[ColumnElement[Any]] = [
        count_if().label("running"),
        count_if(last_sign_of_life < now - stale_after).label("stale"),
        func.min(case((running, last_sign_of_life))).label("oldest"),
        func.sum(
            case((running, cast(dialect(conn).epoch_seconds(last_sign_of_life), Float)))
        ).label("epoch_sum"),
        func.coalesce(
            func.sum(
                case(
                    (and_(runs.c.worker_id.is_not(None), runs.c.last_heartbeat_at.is_(None)), 1),
                    else_=0,
                )
            ),
            0,
        ).label("locked_without_heartbeat"),
        count_if(
            runs.c.cancel_requested.is_(True), runs.c.cancel_requested_at < now - cancel_grace
        ).label("cancel_overdue"),
    ]
    columns += [
        count_if(last_sign_of_life >= now - timedelta(seconds=bound)).label(f"le_{i}")
        for i, bound in enumerate(bounds)
    ]
    row = conn.execute(
        select(*columns).where(runs.c.state.in_(sorted(s.value for s in ACTIVE_STATES)))
    ).one()
    count = int(row.running)
    oldest = _utc(row.oldest) if row.oldest is not None else None
    epoch_sum = float(row.epoch_sum or 0.0)
    return LiveRuns(
        running=count,
        stale=int(row.stale),
        oldest_sign_of_life=oldest,
        age_sum_seconds=max(0.0, count * now.timestamp() - epoch_sum) if count else 0.0,
        age_buckets={bound: int(row._mapping[f"le_{i}"]) for i, bound in enumerate(bounds)},
        locked_without_heartbeat=int(row.locked_without_heartbeat),
        cancel_overdue=int(row.cancel_overdue),
    )


def active_runs_by_tenant(conn: Connection, *, limit: int) -> dict[tuple[str, str], int]:
    """PENDING and RUNNING runs per (tenant, state) for the first ``limit`` tenants by name.

    The rest are summed under the tenant ``_other``, so the number of series
    never exceeds ``limit + 1`` per state, whatever the number of tenants.
    """
    rows = conn.execute(
        select(runs.c.tenant_id, runs.c.state, func.count())
        .where(runs.c.state.in_(sorted(s.value for s in ACTIVE_STATES)))
        .group_by(runs.c.tenant_id, runs.c.state)
        .order_by(runs.c.tenant_id)
    )
    result: dict[tuple[str, str], int] = {}
    shown: set[str] = set()
    for tenant, state, count in rows:
        if tenant not in shown and len(shown) >= limit:
            tenant = OTHER_TENANTS
        else:
            shown.add(tenant)
        result[(tenant, state)] = result.get((tenant, state), 0) + count
    return result


@dataclass(frozen=True)
class Silence:
    """A running run and how long its worker has been silent, for `runsvc runs stale`."""

    run_id: str
    number: int
    tenant_id: str
    worker_id: str | None
    last_sign_of_life: datetime
    age_seconds: float


def longest_silences(conn: Connection, *, now: datetime, limit: int) -> list[Silence]:
    """The running runs whose last sign of life is oldest, oldest first."""
    rows = conn.execute(
        select(
            runs.c.id,
            runs.c.number,
            runs.c.tenant_id,
            runs.c.worker_id,
            last_sign_of_life.label("seen"),
        )
        .where(runs.c.state == RunState.RUNNING.value)
        .order_by(last_sign_of_life, runs.c.id)
        .limit(limit)
    ).all()
    found = []
    for row in rows:
        seen = _utc(row.seen)
        found.append(
            Silence(
                run_id=row.id,
                number=int(row.number),
                tenant_id=row.tenant_id,
                worker_id=row.worker_id,
                last_sign_of_life=seen,
                age_seconds=max(0.0, (now - seen).total_seconds()),
            )
        )
    return found
