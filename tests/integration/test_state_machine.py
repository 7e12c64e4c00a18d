"""Random sequences of everything that can happen to runs, over the real store and service.

After every step the store's invariants hold (``runsvc.store.check``): one
terminal transition per run, each job in one state, no unfinished job in an
ended run, one active run per tenant. Time jumps, reaper passes and replica
restarts (a new Database: trust starts over) are steps like any other.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select

from runsvc.clock import FakeClock
from runsvc.domain import JobOutcome, JobResult, JobSpec, LivenessPolicy, RunOutcome
from runsvc.errors import ActiveRunExists, FailedPrecondition, NoActiveRun
from runsvc.reaper import Reaper
from runsvc.service import RunService
from runsvc.slots import SlotLimits, StoreSlots
from runsvc.store import check
from runsvc.store.engine import Database, make_engine
from runsvc.store.schema import metadata, runs
from tests.conftest import BACKEND, WORKER
from tests.support.databases import truncate

# CI size: 100 examples on each engine (the 200); RUNSVC_PROPERTY_EXAMPLES for more.
EXAMPLES = int(os.environ.get("RUNSVC_PROPERTY_EXAMPLES", "100"))
TENANTS = ("a", "b")
WORKERS = ("w1", "w2")
REFUSALS = (FailedPrecondition, NoActiveRun, ActiveRunExists)


def machine_for(new_url: Callable[[], str]) -> type[RuleBasedStateMachine]:
    class RunsMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.url = new_url()
            self.clock = FakeClock()
            self.requests = itertools.count()
            # (tenant, worker) -> (run_id, lease_epoch, job ids held)
            self.leases: dict[tuple[str, str], tuple[str, int, list[str]]] = {}
            self._start()

        def _start(self) -> None:
            self.db = Database(make_engine(self.url, max_connections=4))
            # The breaker is off here: with two tenants it would hold most passes back.
            policy = replace(LivenessPolicy(), breaker_share=1.0)
            self.service = RunService(
                db=self.db,
                clock=self.clock,
                slots=StoreSlots(SlotLimits(default=2)),
                policy=policy,
            )

        def teardown(self) -> None:
            self.db.dispose()

        def _latest(self, tenant: str) -> str | None:
            return self.db.run(
                lambda conn: conn.execute(
                    select(runs.c.id)
                    .where(runs.c.tenant_id == tenant)
                    .order_by(runs.c.created_at.desc(), runs.c.id.desc())
                    .limit(1)
                ).scalar()
            )

        @rule(tenant=st.sampled_from(TENANTS), jobs=st.integers(1, 4))
        def create(self, tenant: str, jobs: int) -> None:
            try:
                self.service.backend.create_run(
                    tenant_id=tenant,
                    request_id=f"r{next(self.requests)}",
                    jobs=[JobSpec(f"c{i}", b"x") for i in range(jobs)],
                    caller=BACKEND,
                )
            except ActiveRunExists:
                pass

        @rule(tenant=st.sampled_from(TENANTS), worker=st.sampled_from(WORKERS))
        def claim(self, tenant: str, worker: str) -> None:
            claim = self.service.worker.claim_run(tenant_id=tenant, worker_id=worker, caller=WORKER)
            if claim is not None:
                self.leases[(tenant, worker)] = (claim.run.id, claim.lease_epoch, [])

        @precondition(lambda self: bool(self.leases))
        @rule(data=st.data())
        def heartbeat(self, data: st.DataObject) -> None:
            (tenant, _), (run_id, epoch, _) = data.draw(
                st.sampled_from(sorted(self.leases.items()))
            )
            try:
                self.service.worker.heartbeat(
                    tenant_id=tenant, run_id=run_id, lease_epoch=epoch, caller=WORKER
                )
            except REFUSALS:
                pass

        @precondition(lambda self: bool(self.leases))
        @rule(data=st.data(), n=st.integers(1, 3))
        def acquire(self, data: st.DataObject, n: int) -> None:
            key = data.draw(st.sampled_from(sorted(self.leases)))
            run_id, epoch, held = self.leases[key]
            try:
                got = self.service.worker.acquire_jobs(
                    tenant_id=key[0], run_id=run_id, lease_epoch=epoch, max_jobs=n, caller=WORKER
                )
            except REFUSALS:
                return
            self.leases[key] = (run_id, epoch, held + [j.id for j in got.jobs])

        @precondition(lambda self: any(held for _, _, held in self.leases.values()))
        @rule(data=st.data(), ok=st.booleans())
        def report(self, data: st.DataObject, ok: bool) -> None:
            key = data.draw(st.sampled_from(sorted(k for k, v in self.leases.items() if v[2])))
            run_id, epoch, held = self.leases[key]
            outcome = JobOutcome.COMPLETED if ok else JobOutcome.FAILED
            try:
                self.service.worker.report_jobs(
                    tenant_id=key[0],
                    run_id=run_id,
                    lease_epoch=epoch,
                    results=[JobResult(j, outcome) for j in held],
                    caller=WORKER,
                )
            except REFUSALS:
                pass
            self.leases[key] = (run_id, epoch, [])

        @precondition(lambda self: bool(self.leases))
        @rule(data=st.data(), outcome=st.sampled_from(list(RunOutcome)))
        def finish(self, data: st.DataObject, outcome: RunOutcome) -> None:
            key = data.draw(st.sampled_from(sorted(self.leases)))
            run_id, epoch, _ = self.leases[key]
            try:
                self.service.worker.finish_run(
                    tenant_id=key[0],
                    run_id=run_id,
                    lease_epoch=epoch,
                    outcome=outcome,
                    error=None,
                    caller=WORKER,
                )
            except REFUSALS:
                pass

        @rule(tenant=st.sampled_from(TENANTS), force=st.booleans())
        def cancel(self, tenant: str, force: bool) -> None:
            run_id = self._latest(tenant)
            if run_id is None:
                return
            try:
                if force:
                    self.service.backend.force_cancel(
                        tenant_id=tenant, run_id=run_id, reason="test", caller=BACKEND
                    )
                else:
                    self.service.backend.cancel(
                        tenant_id=tenant, run_id=run_id, reason="test", caller=BACKEND
                    )
            except REFUSALS:
                pass

        @rule(tenant=st.sampled_from(TENANTS))
        def read(self, tenant: str) -> None:
            try:
                self.service.backend.get_active(tenant_id=tenant, caller=BACKEND)
            except NoActiveRun:
                pass

        @rule(seconds=st.sampled_from([0.5, 5, 20, 31, 65, 301]))
        def time_jump(self, seconds: float) -> None:
            self.clock.advance(seconds)

        @rule()
        def reap(self) -> None:
            Reaper(self.service.context).pass_once()

        @rule()
        def restart(self) -> None:
            self.db.dispose()
            self._start()

        @invariant()
        def store_is_consistent(self) -> None:
            found = self.db.run(check.violations)
            assert found == [], found

    return RunsMachine


@pytest.mark.parametrize(
    "engine", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_the_invariants_hold_after_every_step(
    engine: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if engine == "sqlite":
        paths = itertools.count()

        def new_url() -> str:
            url = f"sqlite:///{tmp_path / f'm{next(paths)}.db'}"
            created = make_engine(url)
            metadata.create_all(created)
            created.dispose()
            return url
    else:
        pg = request.getfixturevalue("postgres_url")

        def new_url() -> str:
            truncate(pg)
            return pg

    run_state_machine_as_test(
        machine_for(new_url),
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=15,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
