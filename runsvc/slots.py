"""Concurrency slots: how many of a tenant's jobs may be in progress at once.

The seam every slot backend fills. The store-backed backend here is the
embedded default and needs no other service: a job in progress *is* its slot,
so granting counts the tenant's in-progress jobs and releasing happens by
the same statement that moves a job out of progress. It is race-free because
a tenant has at most one active run and AcquireJobs holds that run's row lock
(PostgreSQL) or the database write lock (SQLite) while it counts and takes.

A backend that keeps slots outside the database (``runsvc.redisslots``)
``reserves_ahead``: AcquireJobs reserves slots before its transaction and
gives back what the transaction did not use, and every move of a job out of
progress records a release in the same transaction, applied after commit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from sqlalchemy import Connection

from runsvc.domain import HeldSlot
from runsvc.store import jobs as job_store

__all__ = ["HeldSlot", "Reservation", "SlotLimits", "SlotRelease", "Slots", "StoreSlots"]


@dataclass(frozen=True)
class SlotLimits:
    default: int = 10
    per_tenant: Mapping[str, int] = field(default_factory=dict)

    def limit(self, tenant_id: str) -> int:
        return self.per_tenant.get(tenant_id, self.default)


@dataclass(frozen=True)
class Reservation:
    """Slots granted ahead of a transaction, and how many stay free after them."""

    granted: list[HeldSlot]
    free: int


@dataclass
class SlotRelease:
    """A release recorded in a transaction; ``applied`` is known once it committed."""

    release_id: int
    count: int
    applied: bool = False


class Slots(Protocol):
    reserves_ahead: bool

    def grant(self, conn: Connection, *, tenant_id: str, wanted: int) -> int:
        """How many of ``wanted`` jobs the tenant may start now (inside the transaction)."""
        ...

    def free(self, conn: Connection, *, tenant_id: str) -> int:
        """The tenant's free slots now, as far as the transaction can tell."""
        ...

    def reserve(
        self, *, tenant_id: str, run_id: str, lease_epoch: int, job_ids: Sequence[str]
    ) -> Reservation:
        """Take slots for these jobs before the transaction (never inside one)."""
        ...

    def give_back(self, *, tenant_id: str, slots: Sequence[HeldSlot]) -> None:
        """Return reserved slots no transaction used; best effort, outside any transaction."""
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


class StoreSlots:
    reserves_ahead = False

    def __init__(self, limits: SlotLimits) -> None:
        self.limits = limits

    def free(self, conn: Connection, *, tenant_id: str) -> int:
        in_use = job_store.count_in_progress(conn, tenant_id=tenant_id)
        return max(0, self.limits.limit(tenant_id) - in_use)

    def grant(self, conn: Connection, *, tenant_id: str, wanted: int) -> int:
        return min(wanted, self.free(conn, tenant_id=tenant_id))

    # A job in progress is its own slot: nothing to reserve, release or refresh.

    def reserve(
        self, *, tenant_id: str, run_id: str, lease_epoch: int, job_ids: Sequence[str]
    ) -> Reservation:
        raise NotImplementedError("store slots are granted inside the transaction")

    def give_back(self, *, tenant_id: str, slots: Sequence[HeldSlot]) -> None:
        return None

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
