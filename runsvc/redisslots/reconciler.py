"""The reconciler: makes Redis's slots agree with PostgreSQL's jobs in progress.

PostgreSQL is the truth: a job in progress holds exactly one slot, named by
its row. Per tenant the reconciler reads the live slots in Redis *first*, then
the jobs in progress, so that every race resolves safely:

* a slot granted after the Redis read whose job committed before the
  PostgreSQL read looks missing; restoring it is a no-op (``ZADD NX``);
* a slot whose job left progress after the Redis read looks orphaned; it is
  being released anyway;
* a slot restored for a job that left progress meanwhile is removed again
  once a second read shows that job out of progress;
* a slot whose AcquireJobs has not committed yet looks orphaned; it is only
  removed once it was granted longer ago than the grace period (far longer
  than a transaction). Its grant time decides, not its expiry: the lease
  holder's heartbeats refresh every slot of its run, so a slot reserved by a
  replica that died before its commit would otherwise look fresh for as long
  as the run heartbeats, and hold a slot of the tenant's limit all that time.

Replicas take turns: a periodic pass needs the reconciler's lease for the
interval (:mod:`runsvc.periodic`), so the fleet compares about once per
interval, not once per replica. A rebuild never waits for a turn: every
replica that finds Redis not ready rebuilds at once (taking the turn if it is
free), which is safe for the reasons above (two passes that meet restore the
same slots, ``ZADD NX``).

When Redis lost its data (restart, flush) the ``ready`` marker is gone and no
slot is granted until a pass has rebuilt every tenant from PostgreSQL; then
the marker is set. Over-admission is therefore bounded by the slots granted
in the instant before the loss whose transaction committed after the
rebuild's read (at most one AcquireJobs batch per tenant), and lasts until
the next pass restores them.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import redis
from sqlalchemy import Connection

from runsvc.domain import HeldSlot
from runsvc.errors import RunsvcError
from runsvc.periodic import IntervalLease
from runsvc.redisslots.backend import RedisSlotStore
from runsvc.redisslots.metrics import SlotMetrics
from runsvc.store import jobs as job_store
from runsvc.store.engine import Database

log = logging.getLogger(__name__)


@dataclass
class TenantDrift:
    orphans_removed: int = 0
    missing_restored: int = 0


@dataclass
class ReconcileReport:
    rebuilt: bool = False
    tenants: dict[str, TenantDrift] = field(default_factory=dict)

    @property
    def orphans_removed(self) -> int:
        return sum(t.orphans_removed for t in self.tenants.values())

    @property
    def missing_restored(self) -> int:
        return sum(t.missing_restored for t in self.tenants.values())

    def as_dict(self) -> dict[str, object]:
        return {
            "rebuilt": self.rebuilt,
            "orphans_removed": self.orphans_removed,
            "missing_restored": self.missing_restored,
            "tenants": {
                t: {"orphans_removed": d.orphans_removed, "missing_restored": d.missing_restored}
                for t, d in sorted(self.tenants.items())
            },
        }


class Reconciler:
    def __init__(
        self,
        db: Database,
        store: RedisSlotStore,
        metrics: SlotMetrics,
        *,
        grace_seconds: float = 10.0,
        interval: float = 30.0,
        turn: IntervalLease | None = None,
    ) -> None:
        self._db = db
        # None: this reconciler never shares (a single process, or an operator's command).
        self.turn = turn
        self._store = store
        self._metrics = metrics
        self._grace_ms = int(grace_seconds * 1000)
        self._interval = interval
        self._wake = threading.Event()
        self._lock = threading.Lock()

    def wake(self) -> None:
        self._wake.set()

    def pass_once(self, *, tenant_id: str | None = None) -> ReconcileReport:
        """One comparison; a full rebuild first if Redis lost its slots. Raises on Redis errors."""
        with self._lock:
            report = ReconcileReport()
            rebuild = not self._store.is_ready()
            # A rebuild covers every tenant, whatever was asked.
            scope = None if rebuild else tenant_id
            tenants = [scope] if scope is not None else self._store.tenants()
            live = {t: set(self._store.live(t)) for t in tenants}

            def read(conn: Connection) -> dict[str, list[HeldSlot]]:
                return job_store.in_progress_slots(conn, tenant_id=scope)

            truth = self._db.run(read)
            restored: dict[str, list[str]] = {}
            for tenant in sorted(set(live) | set(truth)):
                held = {slot.member for slot in truth.get(tenant, [])}
                seen = live.get(tenant, set())
                restored[tenant] = sorted(held - seen)
                drift = TenantDrift(
                    missing_restored=self._store.restore(tenant, restored[tenant]),
                    orphans_removed=self._store.remove_orphans(
                        tenant, sorted(seen - held), grace_ms=self._grace_ms
                    ),
                )
                if drift.missing_restored or drift.orphans_removed:
                    report.tenants[tenant] = drift
            self._undo_restores_that_ended(restored, scope)
            if rebuild:
                self._store.mark_ready()
                report.rebuilt = True
        self._metrics.add("orphans_removed", report.orphans_removed)
        self._metrics.add("missing_restored", report.missing_restored)
        if report.rebuilt or report.tenants:
            log.info("slots reconciled", extra={"reconcile": report.as_dict()})
        return report

    def pass_if_due(self) -> ReconcileReport | None:
        """A pass if it is this replica's turn, or a rebuild if Redis lost its slots; else None.

        Raises on Redis and store errors (a failed pass gives its turn up).
        """
        if self.turn is None:
            return self.pass_once()
        return self.turn.run(self.pass_once, urgent=not self._store.is_ready())

    def _undo_restores_that_ended(self, restored: dict[str, list[str]], scope: str | None) -> None:
        """A job that left progress after the read had its release applied before the
        restore put its slot back: remove those now. Safe without a grace period, since
        these jobs were seen in progress (their grant committed) and a name is never reused.
        """
        if not any(restored.values()):
            return
        now_held = self._db.run(lambda conn: job_store.in_progress_slots(conn, tenant_id=scope))
        for tenant, members in restored.items():
            still = {slot.member for slot in now_held.get(tenant, [])}
            self._store.release(tenant, [m for m in members if m not in still])

    def run_forever(self, stop: threading.Event) -> None:
        """A pass every interval, or at once when woken (Redis lost its slots)."""
        while not stop.is_set():
            self._wake.clear()
            try:
                self.pass_if_due()
            except (redis.RedisError, RunsvcError) as error:
                log.warning("slot reconcile failed; retrying", extra={"error": str(error)})
                stop.wait(1.0)
                continue
            except Exception:
                log.exception("slot reconcile failed unexpectedly")
            self._wake.wait(self._interval)
