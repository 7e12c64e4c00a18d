"""Outage-aware liveness: silence is counted only from regained, uninterrupted database access.

PostgreSQL is reached through the loopback fault proxy; resetting its
connections is a real connection failure, seen by the store like any other.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import pytest
from sqlalchemy.engine import make_url

from runsvc.clock import FakeClock
from runsvc.domain import JobSpec, LivenessPolicy, RunState
from runsvc.errors import NoActiveRun, Unavailable
from runsvc.reaper import REAPER, Reaper
from runsvc.service import RunService
from runsvc.slots import SlotLimits, StoreSlots
from runsvc.store import runs as run_store
from runsvc.store.engine import Database, make_engine
from tests.conftest import BACKEND, WORKER
from tests.support.proxy import TcpProxy

pytestmark = pytest.mark.postgres


@pytest.fixture
def proxied(postgres_url: str) -> Iterator[tuple[TcpProxy, RunService, FakeClock]]:
    url = make_url(postgres_url)
    with TcpProxy(upstream=(url.host or "127.0.0.1", url.port or 5432)) as proxy:
        host, port = proxy.address.rsplit(":", 1)
        through = url.set(host=host, port=int(port)).render_as_string(hide_password=False)
        db = Database(make_engine(through, max_connections=4))
        clock = FakeClock()
        service = RunService(
            db=db, clock=clock, slots=StoreSlots(SlotLimits(default=3)), policy=LivenessPolicy()
        )
        try:
            yield proxy, service, clock
        finally:
            db.dispose()


def _running(service: RunService, tenant: str) -> str:
    service.backend.create_run(
        tenant_id=tenant, request_id="r", jobs=[JobSpec("c", b"x")], caller=BACKEND
    )
    claim = service.worker.claim_run(tenant_id=tenant, worker_id=f"w-{tenant}", caller=WORKER)
    assert claim is not None
    return claim.run.id


def _fail_once(service: RunService) -> None:
    """The server ends this transaction's connection under it: a real connection failure."""
    with pytest.raises(Unavailable):
        service.context.transact(
            lambda conn, now, notes: conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pg_backend_pid())"
            ),
            caller=REAPER,
        )


def test_an_outage_restarts_the_count_for_the_reaper_and_on_read(
    proxied: tuple[TcpProxy, RunService, FakeClock],
) -> None:
    _proxy, service, clock = proxied
    run_id = _running(service, "t1")
    trusted = service.context.db.trust.since
    assert trusted == clock.now()

    clock.advance(20)
    _fail_once(service)
    assert service.context.db.trust.since is None
    clock.advance(1)
    service.context.transact(lambda conn, now, notes: None, caller=REAPER)  # regained at 21 s
    assert service.context.db.trust.since == clock.now()

    clock.advance(15)  # 36 s since the last heartbeat, but only 15 s of trusted access
    assert Reaper(service.context).pass_once().total == 0
    assert service.backend.get_active(tenant_id="t1", caller=BACKEND).state is RunState.RUNNING
    assert service.backend.get_run(tenant_id="t1", run_id=run_id, caller=BACKEND).active

    clock.advance(16)  # 31 s of trusted access: now the silence is real
    with pytest.raises(NoActiveRun):
        service.backend.get_active(tenant_id="t1", caller=BACKEND)
    ended = service.backend.get_run(tenant_id="t1", run_id=run_id, caller=BACKEND)
    assert ended.state is RunState.STOPPED


def test_a_fresh_replica_waits_out_the_threshold_before_judging(
    proxied: tuple[TcpProxy, RunService, FakeClock],
    postgres_url: str,
) -> None:
    _proxy, service, clock = proxied
    _running(service, "t1")
    clock.advance(60)
    # A second replica starting now has seen nothing yet.
    db = Database(make_engine(postgres_url, max_connections=2))
    try:
        other = RunService(
            db=db, clock=clock, slots=StoreSlots(SlotLimits(default=3)), policy=LivenessPolicy()
        )
        assert Reaper(other.context).pass_once().total == 0
        clock.advance(31)
        assert Reaper(other.context).pass_once().total == 1
    finally:
        db.dispose()


def test_a_pass_that_would_stop_most_runs_stops_none(
    proxied: tuple[TcpProxy, RunService, FakeClock],
) -> None:
    _proxy, service, clock = proxied
    quiet = [_running(service, f"q{i}") for i in range(3)]
    clock.advance(31)
    _running(service, "lively")  # 4 running, 3 of them silent: more than half
    reaper = Reaper(service.context)
    held = reaper.pass_once()
    assert held.total == 0 and held.held_back == 3
    for run_id in quiet:
        run = service.context.db.run(partial(run_store.get, run_id=run_id, tenant_id=None))
        assert run is not None and run.state is RunState.RUNNING
    # With two more lively runs the share drops to a half: the breaker lets the pass through.
    _running(service, "lively2")
    _running(service, "lively3")
    report = reaper.pass_once()
    assert report.total == 3 and report.held_back == 0
