"""The relay: applies the slot-release outbox to Redis, and keeps live slots alive.

Every replica runs one. A release recorded in a transaction is applied right
after its commit when Redis answers (``apply_now``); whatever is left — Redis
down, a replica that died after committing — the relay drains, oldest first,
retrying with capped exponential backoff. Either way a relay first claims the
rows it applies, for ``claim_seconds`` (database time): the relays of several
replicas drain disjoint rows, and a failed attempt frees its claims for the
retry. A release names exact slots, so applying it twice (a claim that
expired under a stalled relay) frees nothing else; the replica that deletes
the row counts it as applied.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Sequence
from datetime import timedelta

import redis
from sqlalchemy import Connection

from runsvc.clock import Clock
from runsvc.errors import RunsvcError
from runsvc.periodic import replica_name
from runsvc.redisslots.backend import RedisSlotStore
from runsvc.redisslots.metrics import SlotMetrics
from runsvc.store import slot_releases
from runsvc.store.engine import Database

log = logging.getLogger(__name__)

BATCH = 100
FIRST_BACKOFF = 0.1
# Far longer than applying a batch takes; a relay that dies holding claims delays their rows
# by this much, and one that outlives them costs a repeated (harmless) application.
CLAIM_SECONDS = 30.0


class ReleaseRelay:
    def __init__(
        self,
        db: Database,
        store: RedisSlotStore,
        metrics: SlotMetrics,
        *,
        clock: Clock,
        interval: float = 1.0,
        max_backoff: float = 5.0,
        hold: bool = False,
        claim_seconds: float = CLAIM_SECONDS,
        holder: str | None = None,
    ) -> None:
        self._db = db
        self._clock = clock
        self._claim_for = timedelta(seconds=claim_seconds)
        self.holder = holder or replica_name()
        self._store = store
        self._metrics = metrics
        self._interval = interval
        self._max_backoff = max_backoff
        # Test-only: leave every release pending in the outbox (see Settings).
        self._hold = hold
        self._wake = threading.Event()
        self._refresh_lock = threading.Lock()
        self._to_refresh: dict[tuple[str, str], int] = {}

    @property
    def held(self) -> bool:
        return self._hold

    def wake(self) -> None:
        self._wake.set()

    def apply_now(self, release_id: int) -> bool:
        """Apply one just-committed release if Redis is answering; never raises.

        False leaves it to the relay (and wakes it), or says that another
        replica's relay had claimed it first; the caller answers at once.
        """
        if self._hold:
            return False
        if self._store.health.avoid():
            self.wake()
            return False
        try:
            applied = self._apply(ids=[release_id])
        except (redis.RedisError, RunsvcError) as error:
            log.info(
                "slot release left to the relay",
                extra={"release_id": release_id, "error": str(error)},
            )
            self.wake()
            return False
        return applied == 1

    def keep_alive(self, tenant_id: str, run_id: str, lease_epoch: int) -> None:
        with self._refresh_lock:
            key = (tenant_id, run_id)
            self._to_refresh[key] = max(lease_epoch, self._to_refresh.get(key, lease_epoch))

    def drain_once(self) -> int:
        """Apply up to one batch of pending releases; how many rows this call applied."""
        if self._hold:
            return 0
        return self._apply(ids=None)

    def refresh_once(self) -> int:
        with self._refresh_lock:
            pending, self._to_refresh = self._to_refresh, {}
        refreshed = 0
        try:
            for (tenant_id, run_id), epoch in list(pending.items()):
                refreshed += self._store.refresh(tenant_id, run_id, epoch)
                del pending[(tenant_id, run_id)]
        except redis.RedisError:
            self._metrics.add("refresh_failures")
            with self._refresh_lock:
                for key, epoch in pending.items():
                    self._to_refresh.setdefault(key, epoch)
            raise
        return refreshed

    def _apply(self, *, ids: Sequence[int] | None) -> int:
        def claim(conn: Connection) -> list[slot_releases.PendingRelease]:
            now = self._clock.now(conn)
            return slot_releases.claim(
                conn,
                tenant_id=None,
                holder=self.holder,
                now=now,
                until=now + self._claim_for,
                limit=BATCH,
                ids=ids,
            )

        rows = self._db.run(claim)
        if not rows:
            return 0
        done: list[int] = []
        removed: dict[int, int] = {}
        try:
            for row in rows:
                removed[row.id] = self._store.release(row.tenant_id, row.members)
                done.append(row.id)
        except redis.RedisError as error:
            failed = [row.id for row in rows if row.id not in removed]
            self._metrics.add("releases_retried", len(failed))
            reason = str(error)

            def note(conn: Connection) -> None:
                slot_releases.note_failure(
                    conn, failed, tenant_id=None, holder=self.holder, error=reason
                )

            self._db.run(note)
            raise
        finally:
            if done:
                self._delete(rows, done, removed)
        return len(done)

    def _delete(
        self, rows: Sequence[slot_releases.PendingRelease], done: list[int], removed: dict[int, int]
    ) -> None:
        deleted = self._db.run(lambda conn: slot_releases.remove(conn, done, tenant_id=None))
        self._metrics.add("releases_applied", len(deleted))
        for row in rows:
            if row.id in deleted:
                self._metrics.add("slots_removed", removed[row.id])
                log.info(
                    "slot release applied",
                    extra={
                        "release_id": row.id,
                        "tenant_id": row.tenant_id,
                        "run_id": row.run_id,
                        "cause": row.cause,
                        "slots": len(row.members),
                        "removed": removed[row.id],
                        "attempts": row.attempts,
                    },
                )

    def run_forever(self, stop: threading.Event) -> None:
        """Drain and refresh until ``stop``; back off (capped) while Redis or the store fails."""
        failures = 0
        while not stop.is_set():
            self._wake.clear()
            try:
                self.refresh_once()
                applied = self.drain_once()
            except (redis.RedisError, RunsvcError) as error:
                failures += 1
                delay = min(self._max_backoff, FIRST_BACKOFF * 2 ** (failures - 1))
                delay *= random.uniform(0.5, 1.0)
                if failures == 1 or failures % 20 == 0:
                    log.warning(
                        "slot relay cannot reach Redis or the store; retrying",
                        extra={"failures": failures, "delay": round(delay, 3), "error": str(error)},
                    )
                stop.wait(delay)
                continue
            except Exception:
                log.exception("slot relay failed unexpectedly")
                stop.wait(self._max_backoff)
                continue
            if failures:
                log.info("slot relay reaches Redis again", extra={"after_failures": failures})
            failures = 0
            if applied < BATCH:
                self._wake.wait(self._interval)
