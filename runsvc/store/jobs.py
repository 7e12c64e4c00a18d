"""Statements on jobs. Scoped by tenant like every statement of the store."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, Row, Select, func, select, update

from runsvc.domain import HeldSlot, Job, JobOutcome, JobSpec, JobState, StopReason
from runsvc.store.dialects import dialect
from runsvc.store.schema import jobs


def _job_from_row(row: Row[Any]) -> Job:
    return Job(
        id=row.id,
        run_id=row.run_id,
        external_id=row.external_id,
        payload=bytes(row.payload),
        state=JobState(row.state),
        error=row.error,
        late=bool(row.late),
    )


def insert_many(
    conn: Connection, run_id: str, specs: Sequence[JobSpec], *, tenant_id: str, now: datetime
) -> None:
    conn.execute(
        jobs.insert(),
        [
            {
                "id": str(uuid.uuid4()),
                "run_id": run_id,
                "tenant_id": tenant_id,
                "seq": seq,
                "external_id": spec.external_id,
                "payload": spec.payload,
                "state": JobState.QUEUED.value,
                "late": False,
                "created_at": now,
            }
            for seq, spec in enumerate(specs)
        ],
    )


def count_in_progress(conn: Connection, *, tenant_id: str) -> int:
    return conn.execute(
        select(func.count()).where(
            jobs.c.tenant_id == tenant_id, jobs.c.state == JobState.IN_PROGRESS.value
        )
    ).scalar_one()


def _slot_of(row: Any) -> HeldSlot:
    return HeldSlot(row.run_id, row.lease_epoch, row.id, row.slot_token or "")


def _next_queued(run_id: str, tenant_id: str, limit: int) -> Select[Any]:
    return (
        select(jobs.c.id)
        .where(
            jobs.c.run_id == run_id,
            jobs.c.tenant_id == tenant_id,
            jobs.c.state == JobState.QUEUED.value,
        )
        .order_by(jobs.c.seq)
        .limit(limit)
    )


def queued_ids(conn: Connection, run_id: str, *, tenant_id: str, limit: int) -> list[str]:
    """The ids of the run's next queued jobs, in creation order; a read, nothing locked."""
    return list(conn.execute(_next_queued(run_id, tenant_id, limit)).scalars())


def take_reserved(
    conn: Connection,
    run_id: str,
    job_ids: Sequence[str],
    *,
    tenant_id: str,
    lease_epoch: int,
    slot_token: str,
    now: datetime,
) -> list[Job]:
    """Mark exactly these jobs in progress under their reserved slot, those still queued."""
    if not job_ids:
        return []
    rows = conn.execute(
        update(jobs)
        .where(
            jobs.c.id.in_(job_ids),
            jobs.c.run_id == run_id,
            jobs.c.tenant_id == tenant_id,
            jobs.c.state == JobState.QUEUED.value,
        )
        .values(
            state=JobState.IN_PROGRESS.value,
            lease_epoch=lease_epoch,
            slot_token=slot_token,
            started_at=now,
        )
        .returning(*jobs.c)
    ).all()
    return [_job_from_row(r) for r in sorted(rows, key=lambda r: r.seq)]


def in_progress_slots(conn: Connection, *, tenant_id: str | None) -> dict[str, list[HeldSlot]]:
    """The slot of every job in progress, by tenant (every tenant when ``tenant_id`` is None)."""
    query = select(
        jobs.c.tenant_id, jobs.c.run_id, jobs.c.lease_epoch, jobs.c.id, jobs.c.slot_token
    ).where(jobs.c.state == JobState.IN_PROGRESS.value)
    if tenant_id is not None:
        query = query.where(jobs.c.tenant_id == tenant_id)
    found: dict[str, list[HeldSlot]] = {}
    for row in conn.execute(query):
        found.setdefault(row.tenant_id, []).append(_slot_of(row))
    return found


def taken_by(
    conn: Connection, run_id: str, *, tenant_id: str, lease_epoch: int, slot_token: str
) -> list[Job]:
    """The jobs one AcquireJobs call (its token) took under this lease, still in progress."""
    rows = conn.execute(
        select(jobs)
        .where(
            jobs.c.run_id == run_id,
            jobs.c.tenant_id == tenant_id,
            jobs.c.state == JobState.IN_PROGRESS.value,
            jobs.c.lease_epoch == lease_epoch,
            jobs.c.slot_token == slot_token,
        )
        .order_by(jobs.c.seq)
    ).all()
    return [_job_from_row(r) for r in rows]


def take_queued(
    conn: Connection,
    run_id: str,
    *,
    tenant_id: str,
    lease_epoch: int,
    slot_token: str,
    limit: int,
    now: datetime,
) -> list[Job]:
    """Mark up to ``limit`` queued jobs of the run in progress, in creation order."""
    if limit <= 0:
        return []
    next_ids = dialect(conn).claiming(_next_queued(run_id, tenant_id, limit), of=jobs)
    # A CTE runs once; PostgreSQL may re-run an `IN (… LIMIT n)` subquery and
    # so take more than n rows.
    picked = next_ids.cte("picked")
    rows = conn.execute(
        update(jobs)
        .where(jobs.c.id == picked.c.id, jobs.c.state == JobState.QUEUED.value)
        .values(
            state=JobState.IN_PROGRESS.value,
            lease_epoch=lease_epoch,
            slot_token=slot_token,
            started_at=now,
        )
        .returning(*jobs.c)
    ).all()
    return [_job_from_row(r) for r in sorted(rows, key=lambda r: r.seq)]


@dataclass(frozen=True)
class FailedJobs:
    queued: int
    freed: list[HeldSlot]

    @property
    def in_progress(self) -> int:
        return len(self.freed)

    @property
    def total(self) -> int:
        return self.queued + self.in_progress


def fail_in_progress(
    conn: Connection, run_ids: Sequence[str], *, tenant_id: str | None, now: datetime
) -> dict[str, list[HeldSlot]]:
    """Jobs in progress under a lease that is gone fail as WORKER_LOST; their slots, by run.

    The worker may still have run them: its result is accepted later, marked
    late, because the job keeps the ``lease_epoch`` that took it. In-progress
    jobs are few (at most the tenants' slots) and their slots must be named for
    release, so they come back row by row.
    """
    freed: dict[str, list[HeldSlot]] = {}
    for row in conn.execute(
        update(jobs)
        .where(*_of_runs(run_ids, tenant_id), jobs.c.state == JobState.IN_PROGRESS.value)
        .values(state=JobState.FAILED.value, stop_reason=StopReason.WORKER_LOST.value, ended_at=now)
        .returning(jobs.c.run_id, jobs.c.lease_epoch, jobs.c.id, jobs.c.slot_token)
    ):
        freed.setdefault(row.run_id, []).append(_slot_of(row))
    return freed


def fail_unfinished(
    conn: Connection, run_ids: Sequence[str], *, tenant_id: str | None, reason: str, now: datetime
) -> dict[str, FailedJobs]:
    """When runs end early: queued jobs fail with their run's reason, in-progress ones
    WORKER_LOST. Set-based, whatever the number of runs; the outcome of each run."""
    if not run_ids:
        return {}
    freed = fail_in_progress(conn, run_ids, tenant_id=tenant_id, now=now)
    queued = dialect(conn).count_changed(
        conn,
        update(jobs)
        .where(*_of_runs(run_ids, tenant_id), jobs.c.state == JobState.QUEUED.value)
        .values(state=JobState.FAILED.value, stop_reason=reason, ended_at=now),
        by=jobs.c.run_id,
    )
    return {
        run_id: FailedJobs(queued=queued.get(run_id, 0), freed=freed.get(run_id, []))
        for run_id in run_ids
    }


def _of_runs(run_ids: Sequence[str], tenant_id: str | None) -> list[ColumnElement[bool]]:
    scope: list[ColumnElement[bool]] = [jobs.c.run_id.in_(sorted(set(run_ids)))]
    if tenant_id is not None:
        scope.append(jobs.c.tenant_id == tenant_id)
    return scope


@dataclass(frozen=True)
class HeldJob:
    id: str
    state: JobState
    lease_epoch: int | None


def held_by_run(
    conn: Connection, run_id: str, job_ids: Sequence[str], *, tenant_id: str
) -> dict[str, HeldJob]:
    rows = conn.execute(
        select(jobs.c.id, jobs.c.state, jobs.c.lease_epoch).where(
            jobs.c.run_id == run_id, jobs.c.tenant_id == tenant_id, jobs.c.id.in_(job_ids)
        )
    )
    return {r.id: HeldJob(r.id, JobState(r.state), r.lease_epoch) for r in rows}


def record_result(
    conn: Connection,
    job_id: str,
    *,
    tenant_id: str,
    run_id: str,
    lease_epoch: int,
    outcome: JobOutcome,
    error: str | None,
    late: bool,
    now: datetime,
) -> HeldSlot | None:
    """Record one result of a job this lease took; its slot, or None if nothing matched.

    A late result frees no slot: the job's slot was freed when it failed.

    On time: the job must still be in progress under this lease. Late: it
    must have been failed as WORKER_LOST when its run ended, and have no
    result yet.
    """
    held: ColumnElement[bool]
    if late:
        held = (
            (jobs.c.state == JobState.FAILED.value)
            & (jobs.c.stop_reason == StopReason.WORKER_LOST.value)
            & jobs.c.late.is_(False)
        )
    else:
        held = jobs.c.state == JobState.IN_PROGRESS.value
    row = conn.execute(
        update(jobs)
        .where(
            jobs.c.id == job_id,
            jobs.c.run_id == run_id,
            jobs.c.tenant_id == tenant_id,
            jobs.c.lease_epoch == lease_epoch,
            held,
        )
        .values(
            state=JobState(outcome.value).value,
            error=error,
            late=late,
            stop_reason=None,
            ended_at=now,
        )
        .returning(jobs.c.run_id, jobs.c.lease_epoch, jobs.c.id, jobs.c.slot_token)
    ).one_or_none()
    return _slot_of(row) if row is not None else None
