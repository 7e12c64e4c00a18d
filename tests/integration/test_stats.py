"""The store's figures for the exporter, on SQLite and PostgreSQL, with a clock that moves."""

from __future__ import annotations

from datetime import timedelta

from runsvc.clock import FakeClock
from runsvc.domain import JobSpec
from runsvc.service import RunService
from runsvc.store import stats
from runsvc.store.engine import Database
from tests.conftest import BACKEND, WORKER

JOBS = [JobSpec(external_id="j1", payload=b"x")]
BOUNDS = (1.0, 10.0, 60.0)


def live(database: Database, clock: FakeClock) -> stats.LiveRuns:
    return database.run(
        lambda conn: stats.live_runs(
            conn,
            now=clock.now(),
            stale_after=timedelta(seconds=30),
            cancel_grace=timedelta(seconds=60),
            bucket_bounds=BOUNDS,
        )
    )


def test_live_runs_ages_and_staleness(
    service: RunService, database: Database, clock: FakeClock
) -> None:
    for tenant in ("a", "b", "c"):
        service.backend.create_run(tenant_id=tenant, request_id="r", jobs=JOBS, caller=BACKEND)
    first = service.worker.claim_run(tenant_id="a", worker_id="w1", caller=WORKER)
    clock.advance(40)
    second = service.worker.claim_run(tenant_id="b", worker_id="w2", caller=WORKER)
    assert first is not None and second is not None
    clock.advance(5)
    service.backend.cancel(tenant_id="b", run_id=second.run.id, reason="", caller=BACKEND)
    figures = live(database, clock)
    assert figures.running == 2
    assert figures.stale == 1  # a: 45 s silent; b: 5 s
    assert figures.oldest_sign_of_life == first.run.start_time
    assert figures.age_buckets == {1.0: 0, 10.0: 1, 60.0: 2}
    assert abs(figures.age_sum_seconds - 50.0) < 0.01
    assert figures.locked_without_heartbeat == 0
    assert figures.cancel_overdue == 0
    clock.advance(61)
    assert live(database, clock).cancel_overdue == 1
    by_state = database.run(stats.runs_by_state)
    assert by_state["RUNNING"] == 2 and by_state["PENDING"] == 1 and by_state["FAILED"] == 0


def test_nothing_running_is_all_zero(database: Database, clock: FakeClock) -> None:
    figures = live(database, clock)
    assert figures.running == figures.stale == 0
    assert figures.oldest_sign_of_life is None and figures.age_sum_seconds == 0
    assert set(database.run(stats.runs_by_state).values()) == {0}


def test_tenant_series_are_capped(service: RunService, database: Database) -> None:
    for tenant in ("t1", "t2", "t3", "t4"):
        service.backend.create_run(tenant_id=tenant, request_id="r", jobs=JOBS, caller=BACKEND)
    capped = database.run(lambda conn: stats.active_runs_by_tenant(conn, limit=2))
    assert capped == {("t1", "PENDING"): 1, ("t2", "PENDING"): 1, ("_other", "PENDING"): 2}
