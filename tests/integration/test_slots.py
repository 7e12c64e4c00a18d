"""Slot limits hold when many threads on two replicas take jobs at once."""

from __future__ import annotations

import threading

from sqlalchemy import func, select

from runsvc.clock import FakeClock
from runsvc.domain import JobOutcome, JobResult, JobSpec, LivenessPolicy
from runsvc.errors import RunsvcError
from runsvc.service import RunService
from runsvc.slots import SlotLimits, StoreSlots
from runsvc.store.engine import Database, make_engine
from runsvc.store.schema import jobs
from tests.conftest import BACKEND, WORKER

LIMIT = 4
THREADS = 8
ROUNDS = 25


def test_concurrent_acquires_never_exceed_the_limit(db_url: str) -> None:
    clock = FakeClock()
    replicas = [
        RunService(
            db=Database(make_engine(db_url)),
            clock=clock,
            slots=StoreSlots(SlotLimits(default=LIMIT)),
            policy=LivenessPolicy(),
        )
        for _ in range(2)
    ]
    first = replicas[0]
    run = first.backend.create_run(
        tenant_id="t1",
        request_id="r",
        jobs=[JobSpec(f"j{i}", b"") for i in range(THREADS * ROUNDS)],
        caller=BACKEND,
    )
    claim = first.worker.claim_run(tenant_id="t1", worker_id="w", caller=WORKER)
    assert claim is not None
    peaks: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(THREADS)

    def in_progress() -> int:
        return first.context.db.run(
            lambda conn: conn.execute(
                select(func.count()).where(jobs.c.state == "IN_PROGRESS")
            ).scalar_one()
        )

    def worker_thread(index: int) -> None:
        replica = replicas[index % 2]
        try:
            barrier.wait(timeout=10)
            for _ in range(ROUNDS):
                got = replica.worker.acquire_jobs(
                    tenant_id="t1",
                    run_id=run.id,
                    lease_epoch=claim.lease_epoch,
                    max_jobs=3,
                    caller=WORKER,
                )
                peaks.append(in_progress())
                if got.jobs:
                    replica.worker.report_jobs(
                        tenant_id="t1",
                        run_id=run.id,
                        lease_epoch=claim.lease_epoch,
                        results=[JobResult(j.id, JobOutcome.COMPLETED) for j in got.jobs],
                        caller=WORKER,
                    )
        except (RunsvcError, threading.BrokenBarrierError) as error:
            errors.append(error)

    threads = [threading.Thread(target=worker_thread, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert max(peaks) <= LIMIT
    assert max(peaks) > 1  # the threads really overlapped
    for replica in replicas:
        replica.context.db.dispose()
