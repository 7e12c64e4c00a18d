"""Concurrency slots: how many of a tenant's jobs may be in progress at once.

The seam every slot backend fills. The store-backed backend here is the
embedded default and needs no other service: a job in progress *is* its slot,
so granting counts the tenant's in-progress jobs and releasing happens by
the same statement that moves a job out of progress. It is race-free because
a tenant has at most one active run and AcquireJobs holds that run's row lock
(PostgreSQL) or the database write lock (SQLite) while it counts and takes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from sqlalchemy import Connection

from runsvc.store import jobs as job_store


@dataclass(frozen=True)
class SlotLimits:
    default: int = 10
    per_tenant: Mapping[str, int] = field(default_factory=dict)

    def limit(self, tenant_id: str) -> int:
        return self.per_tenant.get(tenant_id, self.default)


class Slots(Protocol):
    def grant(self, conn: Connection, *, tenant_id: str, wanted: int) -> int:
        """How many of ``wanted`` jobs the tenant may start now."""
        ...

    def free(self, conn: Connection, *, tenant_id: str) -> int:
        """The tenant's free slots now."""
        ...


class StoreSlots:
    def __init__(self, limits: SlotLimits) -> None:
        self.limits = limits

    def free(self, conn: Connection, *, tenant_id: str) -> int:
        in_use = job_store.count_in_progress(conn, tenant_id=tenant_id)
        return max(0, self.limits.limit(tenant_id) - in_use)

    def grant(self, conn: Connection, *, tenant_id: str, wanted: int) -> int:
        return min(wanted, self.free(conn, tenant_id=tenant_id))
