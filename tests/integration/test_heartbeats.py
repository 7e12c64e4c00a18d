"""Group commit of heartbeats, on SQLite and PostgreSQL: same answers as one write per call."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import grpc
import pytest
from sqlalchemy import select

from runsvc.api.status import to_status
from runsvc.clock import FakeClock
from runsvc.domain import JobSpec, LivenessPolicy
from runsvc.errors import LeaseLost, RunNotVisible, Unavailable
from runsvc.service import GroupCommit, RunService
from runsvc.service.heartbeats import Beat
from runsvc.service.worker import HeartbeatAck
from runsvc.slots import SlotLimits, StoreSlots
from runsvc.store.engine import Database, make_engine
from runsvc.store.schema import audit_events, runs
from tests.conftest import BACKEND, WORKER

JOIN_TIMEOUT = 30.0


def grouped(database: Database, clock: FakeClock, policy: GroupCommit) -> RunService:
    return RunService(
        db=database,
        clock=clock,
        slots=StoreSlots(SlotLimits(default=3)),
        policy=LivenessPolicy(),
        group_commit=policy,
    )


@pytest.fixture
def batched(database: Database, clock: FakeClock) -> Iterator[RunService]:
    # A long delay: calls fired together are written together.
    service = grouped(database, clock, GroupCommit(max_batch=64, max_delay=0.2))
    yield service
    service.close()


def running_runs(service: RunService, tenants: Sequence[str]) -> dict[str, tuple[str, int]]:
    """One claimed run per tenant: tenant -> (run id, lease epoch)."""
    held = {}
    for tenant in tenants:
        service.backend.create_run(
            tenant_id=tenant,
            request_id="r",
            jobs=[JobSpec(external_id="c", payload=b"x")],
            caller=BACKEND,
        )
        claim = service.worker.claim_run(tenant_id=tenant, worker_id=f"w-{tenant}", caller=WORKER)
        assert claim is not None
        held[tenant] = (claim.run.id, claim.lease_epoch)
    return held


Call = Callable[[], Any]


def fire_together(calls: dict[str, Call]) -> dict[str, Any]:
    """Run every call on its own thread, started at one barrier; result or exception by name."""
    results: dict[str, Any] = {}
    barrier = threading.Barrier(len(calls), timeout=JOIN_TIMEOUT)

    def run(name: str, call: Call) -> None:
        barrier.wait()
        try:
            results[name] = call()
        except Exception as error:
            results[name] = error

    threads = [threading.Thread(target=run, args=item, daemon=True) for item in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a heartbeat was never answered"
    return results


def record_batches(service: RunService) -> list[list[Beat]]:
    batches: list[list[Beat]] = []
    service.heartbeats.after_commit = lambda beats: batches.append(list(beats))  # type: ignore[method-assign]
    return batches


def test_many_leases_some_fenced_some_cancelled_some_foreign(
    batched: RunService, clock: FakeClock
) -> None:
    tenants = [f"t{i}" for i in range(12)]
    held = running_runs(batched, tenants)
    cancelled = set(tenants[:4])
    for tenant in cancelled:
        batched.backend.cancel(
            tenant_id=tenant, run_id=held[tenant][0], reason="stop", caller=BACKEND
        )
    clock.advance(5)
    batches = record_batches(batched)

    def beat(tenant: str, run_id: str, epoch: int) -> Call:
        return lambda: batched.worker.heartbeat(
            tenant_id=tenant, run_id=run_id, lease_epoch=epoch, caller=WORKER
        )

    calls: dict[str, Call] = {}
    for tenant in tenants:
        run_id, epoch = held[tenant]
        calls[f"ok-{tenant}"] = beat(tenant, run_id, epoch)
        calls[f"again-{tenant}"] = beat(tenant, run_id, epoch)  # same run twice in a batch
    for tenant in tenants[:3]:
        run_id, epoch = held[tenant]
        calls[f"fenced-{tenant}"] = beat(tenant, run_id, epoch + 7)
        calls[f"foreign-{tenant}"] = beat("intruder", run_id, epoch)
    calls["fleet"] = beat(None, *held["t11"])  # type: ignore[arg-type]

    results = fire_together(calls)

    now = clock.now()
    for name, result in results.items():
        kind, _, tenant = name.partition("-")
        if kind in {"ok", "again", "fleet"}:
            assert isinstance(result, HeartbeatAck), f"{name}: {result!r}"
            assert result.cancel_requested is (tenant in cancelled), name
            assert result.stale_time == LivenessPolicy().stale_time(now)
        elif kind == "fenced":
            assert isinstance(result, LeaseLost), f"{name}: {result!r}"
            assert result.metadata["current_epoch"] == str(held[tenant][1])
        else:
            assert isinstance(result, RunNotVisible), f"{name}: {result!r}"

    # Written together: far fewer commits than calls, each heartbeat's run once.
    accepted = sum(1 for r in results.values() if isinstance(r, HeartbeatAck))
    assert sum(len(b) for b in batches) == accepted
    assert len(batches) < accepted
    rows = batched.context.db.run(
        lambda c: {r.id: r for r in c.execute(select(runs).where(runs.c.tenant_id.in_(tenants)))}
    )
    for run_id, _ in held.values():
        assert rows[run_id].last_heartbeat_at == now
        assert rows[run_id].lease_epoch == 1 and rows[run_id].state == "RUNNING"
    # A refused look-up leaves its SECURITY row, as without group commit.
    security = batched.context.db.run(
        lambda c: c.execute(select(audit_events).where(audit_events.c.tag == "SECURITY")).all()
    )
    assert len(security) == 3


def test_a_heartbeat_is_answered_only_after_its_commit(
    batched: RunService, database: Database, clock: FakeClock
) -> None:
    held = running_runs(batched, ["t1"])
    run_id, epoch = held["t1"]
    clock.advance(3)
    seen: list[object] = []

    def look(beats: Sequence[Beat]) -> None:
        # Another connection already sees the write when the hook runs.
        seen.append(
            database.run(
                lambda c: c.execute(
                    select(runs.c.last_heartbeat_at).where(runs.c.id == run_id)
                ).scalar_one()
            )
        )

    batched.heartbeats.after_commit = look  # type: ignore[method-assign]
    batched.worker.heartbeat(tenant_id="t1", run_id=run_id, lease_epoch=epoch, caller=WORKER)
    assert seen == [clock.now()]


def test_a_full_queue_pushes_back_instead_of_growing(database: Database, clock: FakeClock) -> None:
    service = grouped(
        database, clock, GroupCommit(max_batch=1, max_delay=0, max_queue=1, enqueue_timeout=0.3)
    )
    held = running_runs(service, ["t1", "t2", "t3"])
    release = threading.Event()
    entered = threading.Event()

    def stall(beats: Sequence[Beat]) -> None:
        entered.set()
        release.wait(JOIN_TIMEOUT)

    service.heartbeats.after_commit = stall  # type: ignore[method-assign]

    def beat(tenant: str) -> Call:
        run_id, epoch = held[tenant]
        return lambda: service.worker.heartbeat(
            tenant_id=tenant, run_id=run_id, lease_epoch=epoch, caller=WORKER
        )

    try:
        first = threading.Thread(target=beat("t1"), daemon=True)
        first.start()
        assert entered.wait(JOIN_TIMEOUT)  # the flusher is busy with t1
        second = threading.Thread(target=beat("t2"), daemon=True)
        second.start()  # queued: the queue is now full
        with pytest.raises(Unavailable, match="too many heartbeats"):
            beat("t3")()
    finally:
        release.set()
        service.close()
    first.join(JOIN_TIMEOUT)
    second.join(JOIN_TIMEOUT)
    assert not first.is_alive() and not second.is_alive()


def test_close_writes_what_is_queued_then_refuses(database: Database, clock: FakeClock) -> None:
    service = grouped(database, clock, GroupCommit(max_batch=100, max_delay=0.5))
    tenants = [f"t{i}" for i in range(5)]
    held = running_runs(service, tenants)
    clock.advance(2)
    results: dict[str, Any] = {}

    def beat(tenant: str) -> None:
        run_id, epoch = held[tenant]
        results[tenant] = service.worker.heartbeat(
            tenant_id=tenant, run_id=run_id, lease_epoch=epoch, caller=WORKER
        )

    threads = [threading.Thread(target=beat, args=(t,), daemon=True) for t in tenants]
    for thread in threads:
        thread.start()
    # Closing does not wait out the half-second delay: it flushes now.
    service.close()
    for thread in threads:
        thread.join(JOIN_TIMEOUT)
    assert sorted(results) == tenants
    assert all(isinstance(r, HeartbeatAck) for r in results.values())
    with pytest.raises(Unavailable, match="shutting down"):
        beat("t0")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.postgres
def test_a_failed_flush_answers_every_waiting_call_unavailable(clock: FakeClock) -> None:
    # A PostgreSQL that is down: nothing listens on the port.
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/runsvc"
    down = Database(make_engine(url))
    service = grouped(down, clock, GroupCommit(max_batch=64, max_delay=0.2))
    try:
        calls: dict[str, Call] = {
            f"c{i}": partial(
                service.worker.heartbeat,
                tenant_id="t1",
                run_id=f"00000000-0000-4000-8000-{i:012d}",
                lease_epoch=1,
                caller=WORKER,
            )
            for i in range(20)
        }
        results = fire_together(calls)
    finally:
        service.close()
        down.dispose()
    assert len(results) == 20
    for name, result in results.items():
        assert isinstance(result, Unavailable), f"{name}: {result!r}"
        assert to_status(result).code == grpc.StatusCode.UNAVAILABLE
