"""Everything the Redis slot backend runs beside the requests: built and owned by the server."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import redis
from sqlalchemy import Connection

from runsvc.clock import Clock
from runsvc.errors import RunsvcError
from runsvc.periodic import IntervalLease, PassObserver
from runsvc.redisslots.backend import Health, RedisSlots, RedisSlotStore, connect
from runsvc.redisslots.metrics import SlotFigures, SlotMetrics, TenantSlots
from runsvc.redisslots.reconciler import Reconciler
from runsvc.redisslots.relay import ReleaseRelay
from runsvc.slots import SlotLimits
from runsvc.store import jobs as job_store
from runsvc.store import slot_releases
from runsvc.store.engine import Database

log = logging.getLogger(__name__)

# The reconciler's lease, and its name among the background jobs whose passes are counted.
RECONCILER_JOB = "slot_reconciler"


@dataclass(frozen=True)
class RedisSlotConfig:
    """The Redis settings (runsvc/settings.py holds their defaults)."""

    url: str
    key_prefix: str
    timeout_seconds: float
    ttl_seconds: float
    orphan_grace_seconds: float
    reconcile_interval_seconds: float
    relay_interval_seconds: float
    relay_max_backoff_seconds: float


@dataclass
class SlotSync:
    db: Database
    clock: Clock
    limits: SlotLimits
    store: RedisSlotStore
    slots: RedisSlots
    relay: ReleaseRelay
    reconciler: Reconciler
    metrics: SlotMetrics
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        """Rebuild or check the slots once, then run the relay and the reconciler."""
        try:
            self.reconciler.pass_if_due()
        except (redis.RedisError, RunsvcError) as error:
            log.warning("slots not reconciled at start; retrying", extra={"error": str(error)})
        targets = [("slot-relay", self.relay.run_forever)]
        if not self.relay_held:
            targets.append(("slot-reconciler", self.reconciler.run_forever))
        for name, target in targets:
            thread = threading.Thread(target=target, args=(self._stop,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    @property
    def relay_held(self) -> bool:
        return self.relay.held

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.relay.wake()
        self.reconciler.wake()
        for thread in self._threads:
            thread.join(timeout=timeout)
        self.store.client.close()

    def observe(self, observer: PassObserver) -> None:
        """Count the reconciler's passes, done or skipped, with ``observer`` (the metrics)."""
        if self.reconciler.turn is not None:
            self.reconciler.turn.observer = observer

    def backlog(self) -> tuple[int, float]:
        """Slot releases not yet applied to Redis, and the oldest one's age in seconds."""

        def read(conn: Connection) -> tuple[int, float]:
            pending = slot_releases.backlog(conn, tenant_id=None)
            if pending.oldest is None:
                return pending.count, 0.0
            return pending.count, max(0.0, (self.clock.now(conn) - pending.oldest).total_seconds())

        return self.db.run(read)

    def figures(self, *, tenant_id: str | None = None) -> SlotFigures:
        """Slots per tenant (Redis vs PostgreSQL vs limit) and the outbox; read-only."""

        def read(conn: Connection) -> tuple[dict[str, int], slot_releases.Backlog, float]:
            now = self.clock.now(conn)
            held = job_store.in_progress_slots(conn, tenant_id=tenant_id)
            backlog = slot_releases.backlog(conn, tenant_id=tenant_id)
            age = (now - backlog.oldest).total_seconds() if backlog.oldest else 0.0
            return {t: len(s) for t, s in held.items()}, backlog, max(0.0, age)

        in_progress, backlog, age = self.db.run(read)
        notes: list[str] = []
        in_use: dict[str, int] | None
        try:
            tenants = [tenant_id] if tenant_id else self.store.tenants()
            in_use = {t: len(self.store.live(t)) for t in tenants}
            if not self.store.is_ready():
                notes.append("Redis lost its slots; the reconciler is rebuilding them")
        except redis.RedisError as error:
            in_use = None
            notes.append(f"Redis unavailable: {error}")
        names = sorted(set(in_progress) | set(in_use or {}))
        return SlotFigures(
            tenants=[
                TenantSlots(
                    tenant_id=t,
                    in_use=None if in_use is None else in_use.get(t, 0),
                    in_progress=in_progress.get(t, 0),
                    limit=self.limits.limit(t),
                )
                for t in names
            ],
            release_backlog=backlog.count,
            release_oldest_age_seconds=age,
            counts=self.metrics.counts(),
            redis_ok=in_use is not None,
            notes=notes,
        )


def build(db: Database, clock: Clock, limits: SlotLimits, config: RedisSlotConfig) -> SlotSync:
    health = Health()
    client = connect(config.url, timeout=config.timeout_seconds)
    store = RedisSlotStore(
        client, prefix=config.key_prefix, ttl_seconds=config.ttl_seconds, health=health
    )
    metrics = SlotMetrics()
    relay = ReleaseRelay(
        db,
        store,
        metrics,
        clock=clock,
        interval=config.relay_interval_seconds,
        max_backoff=config.relay_max_backoff_seconds,
    )
    reconciler = Reconciler(
        db,
        store,
        metrics,
        grace_seconds=config.orphan_grace_seconds,
        interval=config.reconcile_interval_seconds,
        turn=IntervalLease(
            db, clock, job=RECONCILER_JOB, interval=config.reconcile_interval_seconds
        ),
    )
    slots = RedisSlots(
        store,
        limits,
        metrics,
        apply_release=relay.apply_now,
        keep_alive=relay.keep_alive,
        not_ready=reconciler.wake,
    )
    return SlotSync(db, clock, limits, store, slots, relay, reconciler, metrics)
