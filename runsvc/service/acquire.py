"""How AcquireJobs takes jobs within the tenant's slots: one seam, chosen at wiring.

:class:`TakeCounted` serves slots that live in the database (the embedded
default): a job in progress *is* its slot, so one transaction counts the free
slots and takes that many jobs, race-free because it holds the run's row lock
(PostgreSQL) or the write lock (SQLite). :class:`TakeReserved` serves slots kept
outside the database (Redis): they are reserved before the transaction, the
jobs are taken in it, and what it did not use goes back. A crash between the two
can only leave a slot that no job holds (it expires, or the reconciler removes
it), never a job in progress without its slot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from sqlalchemy import Connection

from runsvc.domain import Job
from runsvc.service.context import Caller, Context, Notes
from runsvc.slots import ReservedSlots, Slots
from runsvc.store import jobs as job_store
from runsvc.store import runs as run_store

# Touches the caller's lease in the transaction, or raises why it is not held.
Hold = Callable[[Connection, datetime], run_store.Touched]


@dataclass(frozen=True)
class Acquired:
    jobs: list[Job]
    free_slots: int


@dataclass(frozen=True)
class Wanted:
    """One AcquireJobs call: the lease, how many jobs at most, who asks, and how to hold
    the lease in a transaction."""

    run_id: str
    lease_epoch: int
    max_jobs: int
    caller: Caller
    hold: Hold


class JobTaking(Protocol):
    def acquire(self, ctx: Context, wanted: Wanted) -> Acquired: ...


class TakeCounted:
    def __init__(self, slots: Slots) -> None:
        self._slots = slots

    def acquire(self, ctx: Context, wanted: Wanted) -> Acquired:
        hold, run_id, lease_epoch = wanted.hold, wanted.run_id, wanted.lease_epoch

        def work(conn: Connection, now: datetime, notes: Notes) -> Acquired:
            row = hold(conn, now)
            free = self._slots.free(conn, tenant_id=row.tenant_id)
            if row.cancel_requested:
                return Acquired([], free)  # a run being cancelled starts nothing new
            taken = job_store.take_queued(
                conn,
                run_id,
                tenant_id=row.tenant_id,
                lease_epoch=lease_epoch,
                limit=min(wanted.max_jobs, free),
                now=now,
            )
            return Acquired(taken, free - len(taken))

        return ctx.transact(work, caller=wanted.caller)


class TakeReserved:
    def __init__(self, slots: ReservedSlots) -> None:
        self._slots = slots

    def acquire(self, ctx: Context, wanted: Wanted) -> Acquired:
        hold, run_id, lease_epoch = wanted.hold, wanted.run_id, wanted.lease_epoch

        def look(conn: Connection, now: datetime, notes: Notes) -> tuple[str, list[str]]:
            row = hold(conn, now)
            if row.cancel_requested:
                return row.tenant_id, []  # a run being cancelled starts nothing new
            ids = job_store.queued_ids(conn, run_id, tenant_id=row.tenant_id, limit=wanted.max_jobs)
            return row.tenant_id, ids

        tenant_id, candidates = ctx.transact(look, caller=wanted.caller)
        reservation = self._slots.reserve(
            tenant_id=tenant_id, run_id=run_id, lease_epoch=lease_epoch, job_ids=candidates
        )
        if not reservation.granted:
            return Acquired([], reservation.free)
        granted = {held.job_id: held for held in reservation.granted}

        def take(conn: Connection, now: datetime, notes: Notes) -> Acquired:
            row = hold(conn, now)
            taken = []
            if not row.cancel_requested:
                taken = job_store.take_reserved(
                    conn,
                    run_id,
                    list(granted),
                    tenant_id=tenant_id,
                    lease_epoch=lease_epoch,
                    slot_token=reservation.granted[0].token,
                    now=now,
                )
            used = {job.id for job in taken}
            unused = [held for job_id, held in granted.items() if job_id not in used]
            # Another call of this lease took some of these jobs meanwhile: the
            # slots reserved for them go back, recorded with this commit.
            ctx.release_slots(
                conn,
                notes,
                tenant_id=tenant_id,
                run_id=run_id,
                slots=unused,
                cause="unused",
                now=now,
            )
            return Acquired(taken, reservation.free + len(unused))

        try:
            return ctx.transact(take, caller=wanted.caller)
        except Exception:
            # Nothing committed: every reserved slot goes back (if this fails
            # too, they expire or the reconciler removes them).
            self._slots.give_back(tenant_id=tenant_id, slots=reservation.granted)
            raise
