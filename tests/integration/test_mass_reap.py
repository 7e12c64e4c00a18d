"""Three replicas reaping the same mass of stale runs at once: each run ends exactly once."""

from __future__ import annotations

import os
import threading
from dataclasses import replace

import pytest
from sqlalchemy import func, select

from runsvc.clock import FakeClock
from runsvc.domain import JobSpec, LivenessPolicy
from runsvc.reaper import REAPER, Reaper, ReapReport
from runsvc.service import RunService
from runsvc.slots import SlotLimits, StoreSlots
from runsvc.store import check
from runsvc.store.engine import Database, make_engine
from runsvc.store.schema import audit_events
from tests.conftest import BACKEND, WORKER

pytestmark = pytest.mark.postgres

RUNS = 1000 if os.environ.get("RUNSVC_FAULTS_FULL") == "1" else 150


def test_three_replicas_end_every_stale_run_once(postgres_url: str) -> None:
    db_url = postgres_url
    clock = FakeClock()
    policy = LivenessPolicy()
    databases = [Database(make_engine(db_url, max_connections=8)) for _ in range(3)]
    replicas = [
        RunService(db=db, clock=clock, slots=StoreSlots(SlotLimits(default=3)), policy=policy)
        for db in databases
    ]
    try:
        for i in range(RUNS):
            svc = replicas[i % 3]
            svc.backend.create_run(
                tenant_id=f"t{i}", request_id="r", jobs=[JobSpec("c", b"x")], caller=BACKEND
            )
            assert svc.worker.claim_run(tenant_id=f"t{i}", worker_id="w", caller=WORKER)
        for svc in replicas:  # every replica has had database access all along
            svc.context.transact(lambda conn, now, notes: None, caller=REAPER)
        clock.advance(31)

        # All of them silent at once: the breaker holds every replica back.
        assert all(Reaper(s.context).pass_once().held_back == RUNS for s in replicas)

        for svc in replicas:
            svc.context.policy = replace(policy, breaker_share=1.0)
        reports: list[ReapReport] = []
        start = threading.Barrier(3)

        def reap(svc: RunService) -> None:
            start.wait(timeout=30)
            reports.append(Reaper(svc.context, batch_size=100).pass_once())

        threads = [threading.Thread(target=reap, args=(s,)) for s in replicas]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert len(reports) == 3
        assert sum(r.total for r in reports) == RUNS

        db = databases[0]
        ended = db.run(
            lambda conn: conn.execute(
                select(func.count()).where(audit_events.c.action == "RUN_ENDED")
            ).scalar_one()
        )
        assert ended == RUNS
        assert db.run(check.violations) == []
    finally:
        for svc in replicas:
            svc.close()
        for db in databases:
            db.dispose()
