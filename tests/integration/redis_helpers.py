"""Services on the Redis slot backend, and direct looks at Redis and at the tables."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import cast

import redis
from sqlalchemy import func, select

from runsvc.clock import Clock
from runsvc.domain import Job, JobOutcome, JobResult, JobSpec, LivenessPolicy
from runsvc.redisslots import sync as slot_sync
from runsvc.redisslots.backend import RedisSlotStore
from runsvc.server import redis_slot_config
from runsvc.service import RunService
from runsvc.service.acquire import TakeReserved
from runsvc.service.worker import Acquired, Claim
from runsvc.settings import Settings
from runsvc.slots import Reservation, SlotLimits
from runsvc.store import jobs as job_store
from runsvc.store.engine import Database, make_engine
from runsvc.store.schema import jobs, slot_releases
from tests.conftest import BACKEND, WORKER


@dataclass
class Replica:
    service: RunService
    sync: slot_sync.SlotSync

    def close(self) -> None:
        self.sync.store.client.close()
        self.service.context.db.dispose()


def replica(
    db_url: str,
    clock: Clock,
    *,
    redis_url: str,
    prefix: str,
    limits: SlotLimits,
    **config: object,
) -> Replica:
    db = Database(make_engine(db_url))
    # The production defaults, with the test's changes.
    defaults = redis_slot_config(Settings(redis_url=redis_url, redis_key_prefix=prefix))
    assert defaults is not None
    cfg = replace(defaults, **config)  # type: ignore[arg-type]
    sync = slot_sync.build(db, clock, limits, cfg)
    service = RunService(
        db=db,
        clock=clock,
        slots=sync.slots,
        policy=LivenessPolicy(),
        taking=TakeReserved(sync.slots),
    )
    return Replica(service, sync)


def live(client: redis.Redis, prefix: str, tenant: str) -> set[str]:
    return {str(m) for m in client.zrange(f"{prefix}slots:{tenant}", 0, -1)}


def grant_times(store: RedisSlotStore, tenant: str) -> dict[str, int]:
    """Each member's grant time (ms, Redis's clock), as the scripts keep it."""
    raw = cast(dict[str, str], store.client.hgetall(store.keys.granted(tenant)))
    return {m: int(float(t)) for m, t in raw.items()}


def backdate(store: RedisSlotStore, tenant: str, seconds: float) -> None:
    """As if ``seconds`` passed on Redis's clock: every slot of the tenant was granted,
    and last refreshed, that much earlier (its expiry and its grant time move back)."""
    shift = seconds * 1000
    key = store.keys.slots(tenant)
    expiries = cast(list[tuple[str, float]], store.client.zrange(key, 0, -1, withscores=True))
    if expiries:
        store.client.zadd(key, {m: s - shift for m, s in expiries}, xx=True)
    granted = grant_times(store, tenant)
    if granted:
        store.client.hset(
            store.keys.granted(tenant), mapping={m: int(t - shift) for m, t in granted.items()}
        )


def in_progress(service: RunService, tenant: str | None = None) -> int:
    def read(conn: object) -> int:
        query = select(func.count()).where(jobs.c.state == "IN_PROGRESS")
        if tenant is not None:
            query = query.where(jobs.c.tenant_id == tenant)
        return int(conn.execute(query).scalar_one())  # type: ignore[attr-defined]

    return service.context.db.run(read)  # type: ignore[arg-type]


def outbox_rows(service: RunService) -> int:
    return service.context.db.run(
        lambda conn: int(conn.execute(select(func.count()).select_from(slot_releases)).scalar_one())
    )


def start_run(service: RunService, tenant: str, jobs_count: int, *, worker: str = "w") -> Claim:
    service.backend.create_run(
        tenant_id=tenant,
        request_id=f"req-{tenant}-{worker}",
        jobs=[JobSpec(f"j{i}", b"") for i in range(jobs_count)],
        caller=BACKEND,
    )
    claim = service.worker.claim_run(tenant_id=tenant, worker_id=worker, caller=WORKER)
    assert claim is not None
    return claim


def acquire(
    service: RunService, tenant: str, claim: Claim, n: int, *, request_id: str = ""
) -> Acquired:
    return service.worker.acquire_jobs(
        tenant_id=tenant,
        run_id=claim.run.id,
        lease_epoch=claim.lease_epoch,
        max_jobs=n,
        request_id=request_id,
        caller=WORKER,
    )


def report_completed(service: RunService, tenant: str, claim: Claim, taken: list[Job]) -> None:
    service.worker.report_jobs(
        tenant_id=tenant,
        run_id=claim.run.id,
        lease_epoch=claim.lease_epoch,
        results=[JobResult(job.id, JobOutcome.COMPLETED) for job in taken],
        caller=WORKER,
    )


def reserve_for_a_dead_try(
    one: Replica, tenant: str, claim: Claim, *, token: str, job_count: int
) -> tuple[list[str], Reservation]:
    """What a replica that died before its transaction leaves: slots reserved under
    ``token`` for the run's next queued jobs, which stay queued. The job ids, and the
    reservation."""
    job_ids = one.service.context.db.run(
        lambda conn: job_store.queued_ids(conn, claim.run.id, tenant_id=tenant, limit=job_count)
    )
    reservation = one.sync.slots.reserve(
        tenant_id=tenant,
        run_id=claim.run.id,
        lease_epoch=claim.lease_epoch,
        token=token,
        job_ids=job_ids,
    )
    return job_ids, reservation
