"""What one read of a run, and one batch of heartbeats, cost on PostgreSQL: round trips
counted on the wire (through a loopback proxy) and the statements sent."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.engine import make_url

from runsvc import deadline
from runsvc.domain import JobSpec, LivenessPolicy
from runsvc.service import RunService
from runsvc.slots import SlotLimits, StoreSlots
from runsvc.store.clock import DatabaseClock
from runsvc.store.engine import Database, make_engine
from tests.conftest import BACKEND, WORKER
from tests.support.proxy import TcpProxy


@contextmanager
def sent(db: Database, proxy: TcpProxy) -> Iterator[tuple[list[str], list[int]]]:
    """The statements sent inside the block, and (once it ends) the round trips."""
    statements: list[str] = []
    trips: list[int] = []

    def record(*args: Any) -> None:
        statements.append(args[2])  # (conn, cursor, statement, parameters, context, executemany)

    before = proxy.sent
    event.listen(db.engine, "before_cursor_execute", record)
    try:
        yield statements, trips
    finally:
        event.remove(db.engine, "before_cursor_execute", record)
        trips.append(proxy.sent - before)


@pytest.mark.postgres
def test_a_read_of_one_run_is_one_round_trip_and_a_heartbeat_batch_three(
    postgres_url: str,
) -> None:
    """A read of a live run is one statement outside a transaction (the run, its job counts
    and the database's clock), after a SET of the call's bound when the connection's differs;
    a batch of heartbeats is BEGIN with the bound and the clock, the update, COMMIT. The
    driver sends no BEGIN of its own."""
    url = make_url(postgres_url)
    with TcpProxy(upstream=(url.host or "127.0.0.1", url.port or 5432)) as proxy:
        proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        db = Database(make_engine(proxied, max_connections=2))  # one connection, kept
        service = RunService(
            db=db,
            clock=DatabaseClock(),
            slots=StoreSlots(SlotLimits(default=3)),
            policy=LivenessPolicy(),
        )
        try:
            jobs = [JobSpec(external_id=f"call-{i}", payload=b"x") for i in range(3)]
            created = service.backend.create_run(
                tenant_id="t1", request_id="r1", jobs=jobs, caller=BACKEND
            )
            claim = service.worker.claim_run(tenant_id="t1", worker_id="w1", caller=WORKER)
            assert claim is not None
            service.worker.acquire_jobs(
                tenant_id="t1",
                run_id=created.id,
                lease_epoch=claim.lease_epoch,
                max_jobs=1,
                caller=WORKER,
            )
            with deadline.bound(time.monotonic() + 10.0):
                with sent(db, proxy) as (active_sent, active_trips):
                    active = service.backend.get_active(tenant_id="t1", caller=BACKEND)
                with sent(db, proxy) as (get_sent, get_trips):
                    again = service.backend.get_run(
                        tenant_id="t1", run_id=created.id, caller=BACKEND
                    )
            with sent(db, proxy) as (beat_sent, beat_trips):
                service.worker.heartbeat(
                    tenant_id="t1", run_id=created.id, lease_epoch=claim.lease_epoch, caller=WORKER
                )
        finally:
            service.close()
            db.dispose()
    # The first read sets the connection's bound (10 s left: the 5 s step); the next, with a
    # deadline of the same step, is its statement alone.
    assert active_trips == [2], active_sent
    assert active_sent[0] == "SET statement_timeout = 5000"
    assert get_trips == [1], get_sent
    for statements in (active_sent, get_sent):
        assert "LATERAL" in statements[-1] and "now()" in statements[-1]
    assert beat_trips == [3], beat_sent
    assert beat_sent[0].startswith("BEGIN; SELECT now()")
    assert beat_sent[1].startswith("UPDATE runs") and beat_sent[2] == "COMMIT"
    for run in (active, again):
        counts = run.job_counts
        assert (counts.total, counts.queued, counts.in_progress) == (3, 2, 1)
        assert (counts.completed, counts.failed) == (0, 0)
