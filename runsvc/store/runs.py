"""Statements on runs. Every state change is one guarded UPDATE … RETURNING.

Each function takes the open connection (the use case owns the transaction)
and the tenant scope as a required keyword: ``tenant_id=None`` means every
tenant and is only passed for fleet-wide workers and admins.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Row,
    Select,
    String,
    and_,
    bindparam,
    case,
    func,
    literal,
    or_,
    select,
    true,
    update,
)
from sqlalchemy import exc as sa_exc

from runsvc.domain import (
    ACTIVE_STATES,
    Event,
    JobCounts,
    JobState,
    Run,
    RunState,
    holds_lease,
    run_number,
    sources,
    target,
)
from runsvc.store.dialects import TRANSACTION_NOW, dialect
from runsvc.store.schema import jobs, runs

# The seed's fallback: a run with no heartbeat is judged by its lock, then by its last update.
last_sign_of_life = func.coalesce(runs.c.last_heartbeat_at, runs.c.lock_ts, runs.c.updated_at)


# ``last_sign_of_life < t`` spelled so that an index on ``last_heartbeat_at``
# serves it: the heartbeat when there is one, else the seed's fallbacks.
def _silent_before(since: datetime) -> ColumnElement[bool]:
    return or_(
        runs.c.last_heartbeat_at < since,
        and_(
            runs.c.last_heartbeat_at.is_(None),
            func.coalesce(runs.c.lock_ts, runs.c.updated_at) < since,
        ),
    )


_has_unfinished_jobs = (
    select(jobs.c.id)
    .where(
        jobs.c.run_id == runs.c.id,
        jobs.c.state.in_([JobState.QUEUED.value, JobState.IN_PROGRESS.value]),
    )
    .exists()
)


def _scoped(tenant_id: str | None) -> ColumnElement[bool]:
    return runs.c.tenant_id == tenant_id if tenant_id is not None else literal(True)


def held_by(worker: str | ColumnElement[Any]) -> ColumnElement[bool]:
    """SQL of :func:`runsvc.domain.holds_lease`: the run's lease is held by ``worker`` (a
    value or a column) or one of its processes (``worker/…``)."""
    name = literal(worker, String) if isinstance(worker, str) else worker
    return or_(
        runs.c.worker_id == name,
        func.substr(runs.c.worker_id, 1, func.length(name) + 1) == name + "/",
    )


def _state_in(states: Iterable[RunState]) -> ColumnElement[bool]:
    return runs.c.state.in_(sorted(s.value for s in states))


def _run_from_row(row: Row[Any], counts: JobCounts) -> Run:
    return Run(
        id=row.id,
        number=row.number,
        tenant_id=row.tenant_id,
        state=RunState(row.state),
        request_id=row.request_id,
        lease_epoch=row.lease_epoch,
        cancel_requested=bool(row.cancel_requested),
        cancel_reason=row.cancel_reason,
        cancel_request_time=row.cancel_requested_at,
        stop_reason=row.stop_reason,
        worker_id=row.worker_id,
        create_time=row.created_at,
        start_time=row.started_at,
        end_time=row.ended_at,
        last_heartbeat_time=row.last_heartbeat_at,
        job_counts=counts,
    )


def job_counts(conn: Connection, run_ids: Sequence[str]) -> dict[str, JobCounts]:
    """Job counts per run, in one grouped query."""
    if not run_ids:
        return {}
    tallies: dict[str, dict[str, int]] = {run_id: {} for run_id in run_ids}
    rows = conn.execute(
        select(jobs.c.run_id, jobs.c.state, func.count())
        .where(jobs.c.run_id.in_(run_ids))
        .group_by(jobs.c.run_id, jobs.c.state)
    )
    for run_id, state, count in rows:
        tallies[run_id][state] = count
    return {
        run_id: JobCounts(
            total=sum(t.values()),
            queued=t.get(JobState.QUEUED, 0),
            in_progress=t.get(JobState.IN_PROGRESS, 0),
            completed=t.get(JobState.COMPLETED, 0),
            failed=t.get(JobState.FAILED, 0),
        )
        for run_id, t in tallies.items()
    }


def _with_counts(conn: Connection, rows: Sequence[Row[Any]]) -> list[Run]:
    counts = job_counts(conn, [row.id for row in rows])
    return [_run_from_row(row, counts[row.id]) for row in rows]


# A run's job counts beside its row, in the same statement, on PostgreSQL: a
# lateral aggregate over the run's jobs (its index on run_id). Reads of one run
# (GetActive, GetRun) then cost one round trip rather than two.
_COUNTS = (
    select(
        func.count().label("count_total"),
        *(
            func.count().filter(jobs.c.state == state).label(f"count_{state.value.lower()}")
            for state in (
                JobState.QUEUED,
                JobState.IN_PROGRESS,
                JobState.COMPLETED,
                JobState.FAILED,
            )
        ),
    )
    .where(jobs.c.run_id == runs.c.id)
    .lateral("counts")
)


def _one_run(conn: Connection, read: str, params: dict[str, Any]) -> Run | None:
    """The one run that read ``read`` (of :data:`_READS`) finds, with its job counts."""
    if not dialect(conn).lateral:  # two statements: the run, then its counts
        row = conn.execute(_READS[read], params).one_or_none()
        return _with_counts(conn, [row])[0] if row is not None else None
    row = conn.execute(_READS_WITH_COUNTS[read], params).one_or_none()
    if row is None:
        return None
    # The same statement read the database's clock: a read outside a transaction needs no
    # other round trip for it (DatabaseClock); inside one it is the transaction's own.
    conn.info.setdefault(TRANSACTION_NOW, row.read_at)
    counts = JobCounts(
        total=row.count_total,
        queued=row.count_queued,
        in_progress=row.count_in_progress,
        completed=row.count_completed,
        failed=row.count_failed,
    )
    return _run_from_row(row, counts)


# The reads of one run, built once: their cache keys are memoized, so a call pays
# for executing a statement, not for building and hashing it.
_BY_ID = runs.c.id == bindparam("run_id")
_BY_NUMBER = runs.c.number == bindparam("number")
_OF_TENANT = runs.c.tenant_id == bindparam("tenant_id")
_READS = {
    "id": select(runs).where(_BY_ID),
    "id_of_tenant": select(runs).where(_BY_ID, _OF_TENANT),
    "number": select(runs).where(_BY_NUMBER),
    "number_of_tenant": select(runs).where(_BY_NUMBER, _OF_TENANT),
    "active": select(runs).where(_OF_TENANT, _state_in(ACTIVE_STATES)),
    "request": select(runs).where(_OF_TENANT, runs.c.request_id == bindparam("request_id")),
}
_READS_WITH_COUNTS = {
    name: read.add_columns(_COUNTS, func.now().label("read_at")).select_from(
        runs.join(_COUNTS, true())
    )
    for name, read in _READS.items()
}


def get(conn: Connection, run_id: str, *, tenant_id: str | None) -> Run | None:
    if tenant_id is None:
        return _one_run(conn, "id", {"run_id": run_id})
    return _one_run(conn, "id_of_tenant", {"run_id": run_id, "tenant_id": tenant_id})


def get_by_ref(conn: Connection, ref: str, *, tenant_id: str | None) -> Run | None:
    """The run ``ref`` names: its id, or its number (all digits)."""
    number = run_number(ref)
    if number is None:
        return get(conn, ref, tenant_id=tenant_id)
    if tenant_id is None:
        return _one_run(conn, "number", {"number": number})
    return _one_run(conn, "number_of_tenant", {"number": number, "tenant_id": tenant_id})


def exists(conn: Connection, ref: str, *, tenant_id: str | None) -> bool:
    """Whether a run by this id (or number, all digits) exists within the scope: one indexed
    look-up of the id, without the run's job counts."""
    number = run_number(ref)
    named = runs.c.number == number if number is not None else runs.c.id == ref
    return conn.execute(select(runs.c.id).where(named, _scoped(tenant_id))).first() is not None


def get_by_request(conn: Connection, request_id: str, *, tenant_id: str) -> Run | None:
    return _one_run(conn, "request", {"tenant_id": tenant_id, "request_id": request_id})


def get_active(conn: Connection, *, tenant_id: str) -> Run | None:
    return _one_run(conn, "active", {"tenant_id": tenant_id})


@dataclass(frozen=True)
class PageCursor:
    created_at: datetime
    run_id: str


def list_page(
    conn: Connection,
    *,
    tenant_id: str | None,
    states: Sequence[RunState],
    after: PageCursor | None,
    limit: int,
) -> list[Run]:
    """Runs newest first, keyset-paginated on (created_at, id)."""
    query = select(runs).where(_scoped(tenant_id))
    if states:
        query = query.where(_state_in(states))
    if after is not None:
        query = query.where(
            or_(
                runs.c.created_at < after.created_at,
                and_(runs.c.created_at == after.created_at, runs.c.id < after.run_id),
            )
        )
    rows = conn.execute(query.order_by(runs.c.created_at.desc(), runs.c.id.desc()).limit(limit))
    return _with_counts(conn, rows.all())


class DuplicateRun(Exception):
    """The insert hit a unique index: same request_id, or another active run."""


def insert(
    conn: Connection, *, tenant_id: str, run_id: str, request_id: str, now: datetime
) -> None:
    """Insert a pending run in a savepoint: a unique violation leaves the transaction usable."""
    try:
        with conn.begin_nested():
            conn.execute(
                runs.insert().values(
                    id=run_id,
                    tenant_id=tenant_id,
                    request_id=request_id,
                    state=RunState.PENDING.value,
                    cancel_requested=False,
                    lease_epoch=0,
                    created_at=now,
                    updated_at=now,
                )
            )
    except sa_exc.IntegrityError as error:
        raise DuplicateRun() from error


@dataclass(frozen=True)
class Lease:
    """A lease a worker just took: the run and the epoch that fences its writes."""

    run_id: str
    tenant_id: str
    lease_epoch: int


def _take_lease(
    conn: Connection,
    chosen: Select[Any],
    event: Event,
    now: datetime,
    *guards: ColumnElement[bool],
    **values: Any,
) -> Lease | None:
    """Move the run ``chosen`` picks by ``event`` under a new lease epoch, if its state and
    ``guards`` still hold; None if it moved first (another worker won it)."""
    row = conn.execute(
        update(runs)
        .where(runs.c.id == chosen.scalar_subquery(), _state_in(sources(event)), *guards)
        .values(
            state=target(event).value,
            lease_epoch=runs.c.lease_epoch + 1,
            lock_ts=now,
            last_heartbeat_at=now,
            updated_at=now,
            **values,
        )
        .returning(runs.c.id, runs.c.tenant_id, runs.c.lease_epoch)
    ).one_or_none()
    return Lease(row.id, row.tenant_id, row.lease_epoch) if row is not None else None


def claim_pending(
    conn: Connection, *, tenant_id: str | None, worker_id: str, now: datetime
) -> Lease | None:
    """Take the oldest pending run; None when there is none (or another worker won it)."""
    oldest = (
        select(runs.c.id)
        .where(_scoped(tenant_id), _state_in(sources(Event.CLAIM)))
        .order_by(runs.c.created_at, runs.c.id)
        .limit(1)
    )
    oldest = dialect(conn).claiming(oldest, of=runs)
    return _take_lease(conn, oldest, Event.CLAIM, now, worker_id=worker_id, started_at=now)


def resume_held(
    conn: Connection, *, tenant_id: str | None, worker_id: str, now: datetime
) -> Lease | None:
    """Take again the running run this worker already holds, under a new epoch."""
    held = (
        select(runs.c.id)
        .where(
            _scoped(tenant_id),
            runs.c.worker_id == worker_id,
            _state_in(sources(Event.RESUME)),
        )
        .order_by(runs.c.started_at, runs.c.id)
        .limit(1)
    )
    return _take_lease(conn, held, Event.RESUME, now, runs.c.worker_id == worker_id)


def request_cancel(
    conn: Connection, run_id: str, *, tenant_id: str | None, reason: str, now: datetime
) -> bool:
    """Flag a running run for cooperative cancel; the first request's reason is kept."""
    result = conn.execute(
        update(runs)
        .where(
            runs.c.id == run_id,
            _scoped(tenant_id),
            runs.c.state == RunState.RUNNING.value,
            runs.c.cancel_requested.is_(False),
        )
        .values(
            cancel_requested=True,
            cancel_reason=reason,
            cancel_requested_at=now,
            updated_at=now,
        )
    )
    return result.rowcount == 1


@dataclass(frozen=True)
class Guard:
    """Extra conditions a finalizing statement checks besides the state."""

    lease_epoch: int | None = None
    worker: str | None = None  # the lease must be held by this worker identity
    silent_since: datetime | None = None  # last sign of life must be older than this
    cancel_requested: bool | None = None
    cancel_requested_before: datetime | None = None
    nothing_unfinished: bool = False  # no queued or in-progress job may remain

    def conditions(self) -> list[ColumnElement[bool]]:
        held: list[ColumnElement[bool]] = []
        if self.lease_epoch is not None:
            held.append(runs.c.lease_epoch == self.lease_epoch)
        if self.worker is not None:
            held.append(held_by(self.worker))
        if self.silent_since is not None:
            held.append(_silent_before(self.silent_since))
        if self.cancel_requested is not None:
            held.append(runs.c.cancel_requested.is_(self.cancel_requested))
        if self.cancel_requested_before is not None:
            held.append(runs.c.cancel_requested_at < self.cancel_requested_before)
        if self.nothing_unfinished:
            held.append(~_has_unfinished_jobs)
        return held


@dataclass(frozen=True)
class EndedRun:
    """A run as its terminal statement left it."""

    id: str
    tenant_id: str
    state: RunState
    cancel_requested: bool


def end(
    conn: Connection,
    run_ids: Sequence[str],
    *,
    tenant_id: str | None,
    event: Event,
    reason: str | None,
    now: datetime,
    guard: Guard,
    error: str | None = None,
    cancel_reason: str | None = None,
) -> list[EndedRun]:
    """The one terminal transition, for one run or many: one guarded statement.

    Ends every run whose state and guard still hold, and returns those, by id.
    Clears the lock fields and bumps the lease epoch, so that any later write
    of the old lease holder is refused.
    """
    if not run_ids:
        return []
    rows = conn.execute(
        update(runs)
        .where(
            runs.c.id.in_(sorted(set(run_ids))),
            _scoped(tenant_id),
            _state_in(sources(event)),
            *guard.conditions(),
        )
        .values(
            state=target(event).value,
            stop_reason=reason,
            error=error,
            ended_at=now,
            updated_at=now,
            worker_id=None,
            lock_ts=None,
            lease_epoch=runs.c.lease_epoch + 1,
            cancel_reason=func.coalesce(runs.c.cancel_reason, cancel_reason),
        )
        .returning(runs.c.id, runs.c.tenant_id, runs.c.state, runs.c.cancel_requested)
    )
    ended = [EndedRun(r.id, r.tenant_id, RunState(r.state), bool(r.cancel_requested)) for r in rows]
    return sorted(ended, key=lambda r: r.id)


@dataclass(frozen=True)
class SilentRun:
    """A running run that may end for want of its worker."""

    id: str
    tenant_id: str
    cancel_requested: bool


def find_ending(conn: Connection, guard: Guard, *, limit: int) -> list[SilentRun]:
    """Running runs that ``guard`` lets end, longest silent first, claimed for the rest of
    the transaction (see :meth:`runsvc.store.dialects.Dialect.claiming`): replicas reaping
    at once take disjoint batches instead of all reading, then racing for, the same runs.

    The partial indexes on running runs serve it: a silence guard reads the silent runs
    only, a cancel guard the runs being cancelled, however large the history.
    """
    query = (
        select(runs.c.id, runs.c.tenant_id, runs.c.cancel_requested)
        .where(runs.c.state == RunState.RUNNING.value, *guard.conditions())
        .order_by(last_sign_of_life, runs.c.id)
        .limit(limit)
    )
    rows = conn.execute(dialect(conn).claiming(query, of=runs))
    return [SilentRun(r.id, r.tenant_id, bool(r.cancel_requested)) for r in rows]


def count_running_and_silent(conn: Connection, *, silent_since: datetime) -> tuple[int, int]:
    """How many runs are running, and how many of them are silent since ``silent_since``."""
    silent = func.sum(case((_silent_before(silent_since), 1), else_=0))
    row = conn.execute(
        select(func.count(), silent).where(runs.c.state == RunState.RUNNING.value)
    ).one()
    return int(row[0]), int(row[1] or 0)


@dataclass(frozen=True)
class LeaseTouch:
    """One heartbeat of a batch: the run, its caller's tenant scope, and the lease it claims.

    ``tenant_id`` is the scope, as everywhere in the store (None: any tenant);
    ``worker`` the caller's worker identity (None: not bound to one).
    """

    run_id: str
    tenant_id: str | None
    lease_epoch: int
    worker: str | None = None


@dataclass(frozen=True)
class Touched:
    """A run a touch reached, as its statement left it."""

    run_id: str
    tenant_id: str
    cancel_requested: bool
    lease_epoch: int
    worker_id: str | None = None

    def answers(self, touch: LeaseTouch) -> bool:
        """Whether this updated row is the run and lease ``touch`` asked for.

        The row was RUNNING with these values when it was updated, so every
        touch of the batch that names them held its guard too.
        """
        return (
            touch.run_id == self.run_id
            and touch.tenant_id in (None, self.tenant_id)
            and touch.lease_epoch == self.lease_epoch
            and holds_lease(touch.worker, self.worker_id)
        )


_TOUCH_COLUMNS = {
    "run_id": String,
    "tenant_id": String,
    "worker": String,
    "lease_epoch": BigInteger,
}


def _touch_statement(touch: Any) -> Any:
    """``UPDATE runs … FROM touch WHERE id, scope, holder and epoch match AND state = RUNNING
    RETURNING …``: each run row is updated at most once, and a touch whose lease is not
    current matches nothing."""
    return (
        update(runs)
        .where(
            runs.c.id == touch.c.run_id,
            or_(touch.c.tenant_id.is_(None), runs.c.tenant_id == touch.c.tenant_id),
            or_(touch.c.worker.is_(None), held_by(touch.c.worker)),
            runs.c.lease_epoch == touch.c.lease_epoch,
            runs.c.state == RunState.RUNNING.value,
        )
        .values(last_heartbeat_at=bindparam("touched_at"), updated_at=bindparam("touched_at"))
        .returning(
            runs.c.id,
            runs.c.tenant_id,
            runs.c.cancel_requested,
            runs.c.lease_epoch,
            runs.c.worker_id,
        )
    )


def touch_leases(
    conn: Connection, touches: Sequence[LeaseTouch], *, now: datetime
) -> list[Touched]:
    """Record a sign of life from each current lease holder, one statement for all.

    The rows come back in no particular order; :meth:`Touched.answers` pairs them
    with the touches. On PostgreSQL the runs stay locked until the transaction
    ends, which serializes a lease holder's own concurrent calls.
    """
    if not touches:
        return []
    # Sorted and distinct: runs are locked in one order by every batch.
    unique = sorted(set(touches), key=lambda t: (t.run_id, t.tenant_id or "", t.worker or ""))
    statement, params = dialect(conn).with_rows(
        "touch",
        _TOUCH_COLUMNS,
        [(t.run_id, t.tenant_id, t.worker, t.lease_epoch) for t in unique],
        _touch_statement,
    )
    rows = conn.execute(statement, {**params, "touched_at": now})
    return [
        Touched(r.id, r.tenant_id, bool(r.cancel_requested), r.lease_epoch, r.worker_id)
        for r in rows
    ]
