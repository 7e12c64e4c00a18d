"""How AcquireJobs takes jobs within the tenant's slots: one seam, chosen at wiring.

:class:`TakeCounted` serves slots that live in the database (the embedded
default): a job in progress *is* its slot, so one transaction counts the free
slots and takes that many jobs, race-free because it holds the run's row lock
(PostgreSQL) or the write lock (SQLite). :class:`TakeReserved` serves slots kept
outside the database (Redis): they are reserved before the transaction, the
jobs are taken in it, and what it did not use goes back. A crash between the two
can only leave a slot that no job holds (the reconciler removes it once the
grace period since its grant has passed, or it expires if its run stops
heartbeating), never a job in progress without its slot.

Both take jobs under the call's token (:func:`runsvc.domain.grant_token`) and
first look for jobs already taken under it: the jobs of a call whose answer
was lost hold the tenant's slots until the run ends, so its repeat must hand
them out again rather than take others, or a run whose batch fills its slots
could never take a job again. Likewise a repeat finds the Redis slots an
earlier try reserved (their names carry the token) and holds them again.
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
    """One AcquireJobs call: the lease, how many jobs at most, who asks, how to hold
    the lease in a transaction, and the token that names what the call takes;
    ``repeatable`` when the caller named the call (its request_id), so that a try
    of it can have come before."""

    run_id: str
    lease_epoch: int
    max_jobs: int
    caller: Caller
    hold: Hold
    token: str
    repeatable: bool

    def taken_before(self, conn: Connection, tenant_id: str) -> list[Job]:
        """The jobs an earlier try of this call took, still in progress (empty: none)."""
        if not self.repeatable:  # a token of its own: nothing can be under it yet
            return []
        return job_store.taken_by(
            conn,
            self.run_id,
            tenant_id=tenant_id,
            lease_epoch=self.lease_epoch,
            slot_token=self.token,
        )


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
            again = wanted.taken_before(conn, row.tenant_id)
            if again:
                return Acquired(again, free)
            taken = job_store.take_queued(
                conn,
                run_id,
                tenant_id=row.tenant_id,
                lease_epoch=lease_epoch,
                slot_token=wanted.token,
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

        def look(
            conn: Connection, now: datetime, notes: Notes
        ) -> tuple[str, list[str], Acquired | None]:
            row = hold(conn, now)
            if row.cancel_requested:
                return row.tenant_id, [], None  # a run being cancelled starts nothing new
            again = wanted.taken_before(conn, row.tenant_id)
            if again:
                return (
                    row.tenant_id,
                    [],
                    Acquired(again, self._slots.free(conn, tenant_id=row.tenant_id)),
                )
            ids = job_store.queued_ids(conn, run_id, tenant_id=row.tenant_id, limit=wanted.max_jobs)
            return row.tenant_id, ids, None

        tenant_id, candidates, repeated = ctx.transact(look, caller=wanted.caller)
        if repeated is not None:
            return repeated
        reservation = self._slots.reserve(
            tenant_id=tenant_id,
            run_id=run_id,
            lease_epoch=lease_epoch,
            token=wanted.token,
            job_ids=candidates,
        )
        if not reservation.granted and not reservation.again:
            return Acquired([], reservation.free)
        granted = {held.job_id: held for held in [*reservation.granted, *reservation.again]}

        def take(conn: Connection, now: datetime, notes: Notes) -> Acquired:
            row = hold(conn, now)
            # The lease's row is held from here: a try of this call that ran
            # alongside (its answer given up on) committed already or waits.
            again = [] if row.cancel_requested else wanted.taken_before(conn, tenant_id)
            taken: list[Job] = []
            if not row.cancel_requested and not again:
                taken = job_store.take_reserved(
                    conn,
                    run_id,
                    list(granted),
                    tenant_id=tenant_id,
                    lease_epoch=lease_epoch,
                    slot_token=wanted.token,
                    now=now,
                )
            # A slot held again is the slot of its job if that try committed.
            used = {job.id for job in again or taken}
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
            return Acquired(again or taken, reservation.free + len(unused))

        try:
            return ctx.transact(take, caller=wanted.caller)
        except Exception:
            # Nothing committed: every slot this try reserved goes back (if this fails
            # too, they expire or the reconciler removes them). Those held again stay:
            # their try may have committed; if not, the reconciler removes them.
            self._slots.give_back(tenant_id=tenant_id, slots=reservation.granted)
            raise
