"""Redis paused (SIGSTOP) under a real server process while a worker process holds slots.

ForceCancel must not wait for Redis: it commits in PostgreSQL, answers within
its deadline and says how many of the slots it freed are still to be removed
from Redis. Once Redis is back the outbox relay removes them: no slot leaks.
The Redis here is a ``redis-server`` of the test's own on a free port.
"""

from __future__ import annotations

import time

import grpc
import pytest
from sqlalchemy import func, select

from runsvc.store import check
from runsvc.store import jobs as job_store
from runsvc.store.schema import jobs, slot_releases
from runsvc_client.v1 import run_service_pb2 as pb
from runsvc_client.v1 import run_service_pb2_grpc as pb_grpc
from tests.e2e.test_cli import json_lines
from tests.faults.conftest import Fleet, Store, issue
from tests.redis_process import RedisProcess
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

HELD = 3
JOBS = 10
FORCE_CANCEL_DEADLINE = 3.0
REDIS_TIMEOUT = 0.3
PAUSED_AFTER_CANCEL = 2.0  # the relay fails and backs off meanwhile
RELEASE_BOUND = 10.0  # after Redis is back, the outbox is drained within this


def slot_members(redis: RedisProcess, tenant: str) -> set[str]:
    with redis.client() as client:
        return {str(m) for m in client.zrange(f"runsvc:slots:{tenant}", 0, -1)}


def scalar(store: Store, query: object) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(query).scalar_one())  # type: ignore[call-overload]


def in_progress(store: Store) -> int:
    return scalar(store, select(func.count()).where(jobs.c.state == "IN_PROGRESS"))


def outbox(store: Store) -> int:
    return scalar(store, select(func.count()).select_from(slot_releases))


def test_force_cancel_answers_at_once_while_redis_is_paused_and_nothing_leaks(
    fleet: Fleet, store: Store, redis_server: RedisProcess
) -> None:
    server = fleet.server(
        RUNSVC_REDIS_URL=redis_server.url,
        RUNSVC_REDIS_TIMEOUT_SECONDS=str(REDIS_TIMEOUT),
        RUNSVC_SLOT_RELAY_INTERVAL_SECONDS="0.2",
        RUNSVC_SLOT_RELAY_MAX_BACKOFF_SECONDS="2",
        # Only the relay may remove the slots: the reconciler's grace outlasts the test.
        RUNSVC_SLOT_ORPHAN_GRACE_SECONDS="300",
        # The worker must not be reaped while Redis is away: only ForceCancel ends the run.
        RUNSVC_STALE_AFTER_SECONDS="30",
    )
    run_id = fleet.create_run(server.address, "t1", jobs=JOBS)
    worker = fleet.worker(server.address, "t1", "w1", "--hold", "300", "--max-jobs", str(HELD))
    assert worker.run_id() == run_id
    wait_for(lambda: in_progress(store) == HELD, timeout=15)
    held = slot_members(redis_server, "t1")
    assert len(held) == HELD and all(run_id in m for m in held), held

    metadata = [("authorization", f"Bearer {issue('backend', 't1')}")]
    redis_server.pause()
    try:
        with grpc.insecure_channel(server.address) as channel:
            started = time.monotonic()
            done = pb_grpc.RunServiceStub(channel).ForceCancel(
                pb.ForceCancelRequest(run_id=run_id, reason="paused redis"),
                metadata=metadata,
                timeout=FORCE_CANCEL_DEADLINE,
            )
            took = time.monotonic() - started
        # Committed in PostgreSQL and answered; Redis was not needed to answer.
        assert took < FORCE_CANCEL_DEADLINE
        assert done.run.state == pb.RUN_STATE_CANCELLED
        assert done.cancelled_jobs == JOBS
        # All three slots freed in the database's accounting, none of them in Redis yet.
        assert (done.released_slots, done.pending_slot_releases) == (HELD, HELD)
        assert store.run(run_id).state == "CANCELLED"
        assert in_progress(store) == 0
        assert outbox(store) == 1
        # The worker is fenced at its next write even though Redis is away.
        assert worker.process.wait(timeout=15) == 3
        time.sleep(PAUSED_AFTER_CANCEL)
    finally:
        redis_server.resume()
    resumed = time.monotonic()

    drained = wait_for(lambda: outbox(store) == 0, timeout=RELEASE_BOUND)
    # Nothing leaked: Redis holds exactly the in-progress jobs, that is none.
    assert slot_members(redis_server, "t1") == set()
    assert in_progress(store) == 0
    with store.engine.connect() as conn:
        held_jobs = job_store.count_in_progress(conn, tenant_id="t1")
    slots = {"t1": (len(slot_members(redis_server, "t1")), held_jobs)}
    assert check.slot_violations(slots, pending_releases=outbox(store)) == []
    assert server.process.poll() is None
    applied = [r for r in json_lines(server.stderr()) if r.get("message") == "slot release applied"]
    assert [(r["run_id"], r["slots"], r["removed"]) for r in applied] == [(run_id, HELD, HELD)]
    print(
        f"ForceCancel answered in {took:.3f} s with Redis paused "
        f"(released {done.released_slots}, pending {done.pending_slot_releases}); "
        f"outbox drained {drained:.2f} s after Redis resumed "
        f"({time.monotonic() - resumed:.2f} s to the check)"
    )
