"""What one read of a run costs on PostgreSQL, counted in statements sent."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event

from runsvc import deadline
from runsvc.domain import JobSpec, LivenessPolicy
from runsvc.service import RunService
from runsvc.slots import SlotLimits, StoreSlots
from runsvc.store.clock import DatabaseClock
from runsvc.store.engine import Database, make_engine
from tests.conftest import BACKEND, WORKER, _truncate


@contextmanager
def statements(db: Database) -> Iterator[list[str]]:
    sent: list[str] = []

    def record(*args: Any) -> None:
        sent.append(args[2])  # (conn, cursor, statement, parameters, context, executemany)

    event.listen(db.engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(db.engine, "before_cursor_execute", record)


@pytest.mark.postgres
def test_a_read_of_one_run_within_a_call_is_two_statements(postgres_url: str) -> None:
    """The bound and the clock in one, the run and its job counts in the other."""
    _truncate(postgres_url)  # the session's database: another test's runs of t1 stay out
    db = Database(make_engine(postgres_url, max_connections=4))
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
        token = deadline.set(time.monotonic() + 10.0)
        try:
            with statements(db) as active_sent:
                active = service.backend.get_active(tenant_id="t1", caller=BACKEND)
            with statements(db) as get_sent:
                again = service.backend.get_run(tenant_id="t1", run_id=created.id, caller=BACKEND)
        finally:
            deadline.reset(token)
        for sent in (active_sent, get_sent):
            assert len(sent) == 2, sent
            assert "now()" in sent[0] and "statement_timeout" in sent[0]
            assert "LATERAL" in sent[1]
        for run in (active, again):
            counts = run.job_counts
            assert (counts.total, counts.queued, counts.in_progress) == (3, 2, 1)
            assert (counts.completed, counts.failed) == (0, 0)
    finally:
        service.close()
        db.dispose()
