"""Figures of the Redis slot backend, for an exporter to read.

Counters only ever grow; :func:`figures` adds the gauges read at call time.
The Prometheus names they are meant to be exported under:

=========================================  ===================================================
``runsvc_slots_in_use{tenant}``            live slots in Redis (``SlotFigures.tenants``)
``runsvc_slots_in_progress{tenant}``       jobs in progress in PostgreSQL, the truth
``runsvc_slots_limit{tenant}``             the tenant's limit
``runsvc_slot_release_backlog``            outbox rows not yet applied
``runsvc_slot_release_oldest_age_seconds`` age of the oldest of them (0 when none)
``runsvc_slot_releases_applied_total``     outbox rows applied (deleted) by this process
``runsvc_slot_releases_retried_total``     outbox rows whose application failed and waits
``runsvc_slot_drift_fixed_total{kind}``    reconciler repairs: ``orphan`` removed, ``missing``
                                           restored
=========================================  ===================================================
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Counts:
    releases_applied: int
    releases_retried: int
    slots_removed: int
    orphans_removed: int
    missing_restored: int
    refresh_failures: int


class SlotMetrics:
    """Thread-safe counters shared by the backend, the relay and the reconciler."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(Counts.__dataclass_fields__, 0)

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._values[name] += amount

    def counts(self) -> Counts:
        with self._lock:
            return Counts(**self._values)


@dataclass(frozen=True)
class TenantSlots:
    tenant_id: str
    in_use: int | None  # live slots in Redis; None when Redis could not be read
    in_progress: int  # jobs in progress in PostgreSQL
    limit: int


@dataclass(frozen=True)
class SlotFigures:
    tenants: list[TenantSlots]
    release_backlog: int
    release_oldest_age_seconds: float
    counts: Counts
    redis_ok: bool
    notes: list[str] = field(default_factory=list)
