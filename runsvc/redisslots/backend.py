"""The Redis slot backend: fills the seam of :mod:`runsvc.slots`.

Granting is one script call made before AcquireJobs' transaction; releases
are recorded in PostgreSQL with the change that frees them and applied after
commit (at once when Redis answers, else by the relay); the lease holder's
heartbeats keep its slots from expiring, through the relay thread so that a
slow Redis never slows a heartbeat.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import Connection

from runsvc.domain import HeldSlot
from runsvc.errors import Unavailable
from runsvc.redisslots import scripts
from runsvc.redisslots.metrics import SlotMetrics
from runsvc.slots import Reservation, SlotLimits, SlotRelease, free_by_the_store
from runsvc.store import slot_releases

log = logging.getLogger(__name__)


def connect(url: str, *, timeout: float) -> redis.Redis:
    """A client that fails fast: no retries, short timeouts (callers retry on their own terms)."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )


class Health:
    """Whether Redis answered lately: after a failure, callers that must answer at once
    (ForceCancel, reports) skip Redis for ``cooldown`` seconds and leave it to the relay."""

    def __init__(self, *, cooldown: float = 2.0) -> None:
        self._cooldown = cooldown
        self._failed_at: float | None = None
        self._lock = threading.Lock()

    def failed(self) -> None:
        with self._lock:
            self._failed_at = time.monotonic()

    def succeeded(self) -> None:
        with self._lock:
            self._failed_at = None

    def avoid(self) -> bool:
        with self._lock:
            return (
                self._failed_at is not None and time.monotonic() - self._failed_at < self._cooldown
            )


class RedisSlotStore:
    """The script calls, with the tenant's key; every Redis error is ``redis.RedisError``."""

    def __init__(
        self, client: redis.Redis, *, prefix: str, ttl_seconds: float, health: Health
    ) -> None:
        self.client = client
        self.keys = scripts.Keys(prefix)
        self.ttl_ms = int(ttl_seconds * 1000)
        self.health = health
        self._acquire = client.register_script(scripts.ACQUIRE)
        self._release = client.register_script(scripts.RELEASE)
        self._refresh = client.register_script(scripts.REFRESH)
        self._restore = client.register_script(scripts.RESTORE)
        self._remove_orphans = client.register_script(scripts.REMOVE_ORPHANS)
        self._live = client.register_script(scripts.LIVE)

    def _call(self, call: Callable[[], Any]) -> Any:
        try:
            result = call()
        except redis.RedisError:
            self.health.failed()
            raise
        self.health.succeeded()
        return result

    def acquire(
        self, tenant_id: str, *, limit: int, members: Sequence[str]
    ) -> tuple[int, list[str], list[str]]:
        """(free left, members granted now, members an earlier try of the same call holds);
        free is -1 when the set waits to be rebuilt."""
        out = self._call(
            lambda: self._acquire(
                keys=[
                    self.keys.slots(tenant_id),
                    self.keys.ready,
                    self.keys.granted(tenant_id),
                ],
                args=[limit, self.ttl_ms, *members],
            )
        )
        assert isinstance(out, list)
        if int(out[0]) < 0:
            return -1, [], []
        held = [str(m) for m in out[2:]]
        return int(out[0]), held[: int(out[1])], held[int(out[1]) :]

    def _tenant_keys(self, tenant_id: str) -> list[str]:
        """The keys of every script but ACQUIRE: the slot set, then its grant times."""
        return [self.keys.slots(tenant_id), self.keys.granted(tenant_id)]

    def release(self, tenant_id: str, members: Sequence[str]) -> int:
        if not members:
            return 0
        return int(
            self._call(lambda: self._release(keys=self._tenant_keys(tenant_id), args=list(members)))
        )

    def refresh(self, tenant_id: str, run_id: str, lease_epoch: int) -> int:
        prefix = f"{run_id}{HeldSlot.SEPARATOR}{lease_epoch}{HeldSlot.SEPARATOR}"
        return int(
            self._call(
                lambda: self._refresh(keys=self._tenant_keys(tenant_id), args=[self.ttl_ms, prefix])
            )
        )

    def restore(self, tenant_id: str, members: Sequence[str]) -> int:
        if not members:
            return 0
        return int(
            self._call(
                lambda: self._restore(
                    keys=self._tenant_keys(tenant_id), args=[self.ttl_ms, *members]
                )
            )
        )

    def remove_orphans(self, tenant_id: str, members: Sequence[str], *, grace_ms: int) -> int:
        if not members:
            return 0
        return int(
            self._call(
                lambda: self._remove_orphans(
                    keys=self._tenant_keys(tenant_id),
                    args=[self.ttl_ms, grace_ms, *members],
                )
            )
        )

    def live(self, tenant_id: str) -> list[str]:
        out = self._call(lambda: self._live(keys=self._tenant_keys(tenant_id), args=[]))
        assert isinstance(out, list)
        return [str(m) for m in out]

    def tenants(self) -> list[str]:
        keys = self._call(lambda: list(self.client.scan_iter(match=self.keys.slots_pattern)))
        assert isinstance(keys, list)
        return sorted(self.keys.tenant_of(str(k)) for k in keys)

    def is_ready(self) -> bool:
        return bool(self._call(lambda: self.client.exists(self.keys.ready)))

    def mark_ready(self) -> None:
        self._call(lambda: self.client.set(self.keys.ready, str(int(time.time()))))


class RedisSlots:
    """Slots in Redis, reserved ahead of the transaction; see the module docstring."""

    def __init__(
        self,
        store: RedisSlotStore,
        limits: SlotLimits,
        metrics: SlotMetrics,
        *,
        apply_release: Callable[[int], bool],
        keep_alive: Callable[[str, str, int], None],
        not_ready: Callable[[], None],
    ) -> None:
        self.store = store
        self.limits = limits
        self.metrics = metrics
        self._apply = apply_release
        self._keep_alive = keep_alive
        self._not_ready = not_ready

    def free(self, conn: Connection, *, tenant_id: str) -> int:
        # By the truth: what PostgreSQL holds in progress.
        return free_by_the_store(conn, self.limits, tenant_id)

    def reserve(
        self, *, tenant_id: str, run_id: str, lease_epoch: int, token: str, job_ids: Sequence[str]
    ) -> Reservation:
        wanted = [HeldSlot(run_id, lease_epoch, job_id, token) for job_id in job_ids]
        try:
            free, granted, again = self.store.acquire(
                tenant_id,
                limit=self.limits.limit(tenant_id),
                members=[held.member for held in wanted],
            )
        except redis.RedisError as error:
            log.warning("the slot store is unavailable", extra={"error": str(error)})
            raise Unavailable("the slot store is unavailable") from error
        if free < 0:
            # Redis lost its slots (restart, flush): grant nothing until they are rebuilt.
            self._not_ready()
            return Reservation([], 0)
        return Reservation(
            [HeldSlot.parse(m) for m in granted], free, [HeldSlot.parse(m) for m in again]
        )

    def give_back(self, *, tenant_id: str, slots: Sequence[HeldSlot]) -> None:
        try:
            self.store.release(tenant_id, [held.member for held in slots])
        except redis.RedisError as error:
            log.warning(
                "could not give back reserved slots; they expire or are reconciled",
                extra={"tenant_id": tenant_id, "slots": len(slots), "error": str(error)},
            )

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
        release_id = slot_releases.add(
            conn,
            tenant_id=tenant_id,
            run_id=run_id,
            cause=cause,
            members=[held.member for held in slots],
            now=now,
        )
        return SlotRelease(release_id, len(slots))

    def apply_release(self, release: SlotRelease) -> bool:
        return self._apply(release.release_id)

    def keep_alive(self, *, tenant_id: str, run_id: str, lease_epoch: int) -> None:
        self._keep_alive(tenant_id, run_id, lease_epoch)
