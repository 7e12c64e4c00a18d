"""Concurrency slots: how many of a tenant's jobs may be in progress at once.

The seam every slot backend fills. The store-backed backend here is the
embedded default and needs no other service: a job in progress *is* its slot,
so the free slots are the limit less the tenant's in-progress jobs, and
releasing happens by the same statement that moves a job out of progress.

A backend that keeps slots outside the database (``runsvc.redisslots``) is
:class:`ReservedSlots`: AcquireJobs reserves slots before its transaction and
gives back what the transaction did not use, and every move of a job out of
progress records a release in the same transaction, applied after commit.
How AcquireJobs takes jobs with each is chosen at wiring (runsvc.service.acquire).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from sqlalchemy import Connection

from runsvc.domain import HeldSlot
from runsvc.store import jobs as job_store

__all__ = [
    "HeldSlot",
    "Reservation",
    "ReservedSlots",
    "SlotLimits",
    "SlotRelease",
    "Slots",
    "StoreSlots",
]


@dataclass(frozen=True)
class SlotLimits:
    default: int = 10
    per_tenant: Mapping[str, int] = field(default_factory=dict)

    def limit(self, tenant_id: str) -> int:
        return self.per_tenant.get(tenant_id, self.default)


@dataclass(frozen=True)
class Reservation:
    """Slots granted ahead of a transaction, and how many stay free after them.

    ``again``: slots an earlier try of the same call reserved (they carry its token), held
    by this try too. That try may have died before its transaction, or committed it: they
    are not this try's to give back.
    """

    granted: list[HeldSlot]
    free: int
    again: list[HeldSlot] = field(default_factory=list)


@dataclass
class SlotRelease:
    """A release recorded in a transaction; ``applied`` is known once it committed."""

    release_id: int
    count: int
    applied: bool = False


class Slots(Protocol):
    limits: SlotLimits

    def free(self, conn: Connection, *, tenant_id: str) -> int:
        """The tenant's free slots now, as far as the transaction can tell."""
        ...

    def record_release(
        self,
        conn: Connection,
        *,
        tenant_id: str,
        run_id: str | None,
        slots: Sequence[HeldSlot],
        cause: str,
        now: datetime,
    ) -> SlotRelease | None:
        """Record, in the transaction, that these jobs left progress."""
        ...

    def apply_release(self, release: SlotRelease) -> bool:
        """After commit: apply a recorded release now if possible; never raises."""
        ...

    def keep_alive(self, *, tenant_id: str, run_id: str, lease_epoch: int) -> None:
        """The lease holder is alive: its slots must not expire. Never blocks."""
        ...


class ReservedSlots(Slots, Protocol):
    def reserve(
        self, *, tenant_id: str, run_id: str, lease_epoch: int, token: str, job_ids: Sequence[str]
    ) -> Reservation:
        """Take slots for these jobs, named by ``token``, before the transaction (never in one)."""
        ...

    def give_back(self, *, tenant_id: str, slots: Sequence[HeldSlot]) -> None:
        """Return reserved slots no transaction used; best effort, outside any transaction."""
        ...


def free_by_the_store(conn: Connection, limits: SlotLimits, tenant_id: str) -> int:
    """The limit less the tenant's jobs in progress: the database's truth."""
    in_use = job_store.count_in_progress(conn, tenant_id=tenant_id)
    return max(0, limits.limit(tenant_id) - in_use)


class StoreSlots:
    def __init__(self, limits: SlotLimits) -> None:
        self.limits = limits

    def free(self, conn: Connection, *, tenant_id: str) -> int:
        return free_by_the_store(conn, self.limits, tenant_id)

    # A job in progress is its own slot: nothing to reserve, release or refresh.

    def record_release(
        self,
        conn: Connection,
        *,
        tenant_id: str,
        run_id: str | None,
        slots: Sequence[HeldSlot],
        cause: str,
        now: datetime,
    ) -> SlotRelease | None:
        return None

    def apply_release(self, release: SlotRelease) -> bool:
        return True

    def keep_alive(self, *, tenant_id: str, run_id: str, lease_epoch: int) -> None:
        return None
