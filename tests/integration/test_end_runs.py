"""Ending runs in batches (the reaper) leaves exactly what ending them in lists of one leaves."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from sqlalchemy import Connection, select

from runsvc.clock import FakeClock
from runsvc.domain import JobOutcome, JobResult, JobSpec, StopReason
from runsvc.reaper import REAPER, Reaper
from runsvc.service import RunService
from runsvc.service.context import Ended, Notes
from runsvc.store import runs as run_store
from runsvc.store.schema import audit_events, jobs, runs
from tests.conftest import BACKEND, WORKER

# What differs between two runs ended alike: who they are, not how they ended (a job's
# slot token names the AcquireJobs call that took it).
IDENTITY = {
    "id",
    "tenant_id",
    "request_id",
    "run_id",
    "external_id",
    "created_at",
    "number",
    "slot_token",
}


def start_run(service: RunService, tenant: str, *, cancel: bool = False) -> str:
    """A running run with 4 jobs: 1 completed, 1 in progress, 2 queued."""
    service.backend.create_run(
        tenant_id=tenant,
        request_id="r",
        jobs=[JobSpec(external_id=f"c{i}", payload=b"x") for i in range(4)],
        caller=BACKEND,
    )
    claim = service.worker.claim_run(tenant_id=tenant, worker_id=f"w-{tenant}", caller=WORKER)
    assert claim is not None
    run_id, epoch = claim.run.id, claim.lease_epoch
    taken = service.worker.acquire_jobs(
        tenant_id=tenant, run_id=run_id, lease_epoch=epoch, max_jobs=2, caller=WORKER
    )
    service.worker.report_jobs(
        tenant_id=tenant,
        run_id=run_id,
        lease_epoch=epoch,
        results=[JobResult(taken.jobs[0].id, JobOutcome.COMPLETED)],
        caller=WORKER,
    )
    if cancel:
        service.backend.cancel(tenant_id=tenant, run_id=run_id, reason="stop", caller=BACKEND)
    return run_id


def snapshot(service: RunService, run_id: str) -> dict[str, Any]:
    def read(conn: Connection) -> dict[str, Any]:
        run = conn.execute(select(runs).where(runs.c.id == run_id)).one()
        job_rows = conn.execute(select(jobs).where(jobs.c.run_id == run_id).order_by(jobs.c.seq))
        audits = conn.execute(select(audit_events).where(audit_events.c.run_id == run_id))
        return {
            "run": {k: v for k, v in run._mapping.items() if k not in IDENTITY},
            "jobs": [{k: v for k, v in j._mapping.items() if k not in IDENTITY} for j in job_rows],
            "audits": [
                (a.tag, a.action, a.actor, a.created_at, json.loads(a.detail)) for a in audits
            ],
        }

    return service.context.db.run(read)


def test_a_batch_ends_runs_exactly_as_one_by_one(service: RunService, clock: FakeClock) -> None:
    pairs = {
        flag: (
            start_run(service, f"a{flag}", cancel=flag),
            start_run(service, f"b{flag}", cancel=flag),
        )
        for flag in (False, True)
    }
    clock.advance(31)
    ctx = service.context
    horizon = ctx.policy.stale_horizon(clock.now())

    def candidate(run_id: str, flag: bool) -> run_store.SilentRun:
        tenant = ("a" if run_id == pairs[flag][0] else "b") + str(flag)
        return run_store.SilentRun(run_id, tenant, flag)

    def one_by_one(conn: Connection, now: Any, notes: Notes) -> list[Ended]:
        return [
            ended
            for flag in (False, True)
            for ended in ctx.end_lost(
                conn,
                notes,
                [candidate(pairs[flag][0], flag)],
                now=now,
                silent_since=horizon,
                reason=StopReason.HEARTBEAT_TIMEOUT,
                detected_by="reaper",
                caller=REAPER,
            )
        ]

    def batched(conn: Connection, now: Any, notes: Notes) -> list[Ended]:
        return ctx.end_lost(
            conn,
            notes,
            [candidate(pairs[flag][1], flag) for flag in (False, True)],
            now=now,
            silent_since=horizon,
            reason=StopReason.HEARTBEAT_TIMEOUT,
            detected_by="reaper",
            caller=REAPER,
        )

    singles = ctx.transact(one_by_one, caller=REAPER)
    many = ctx.transact(batched, caller=REAPER)

    assert sorted((e.state, e.reason, e.failed_jobs, e.released_slots) for e in many) == sorted(
        (e.state, e.reason, e.failed_jobs, e.released_slots) for e in singles
    )
    for flag in (False, True):
        alone, together = (snapshot(service, run_id) for run_id in pairs[flag])
        assert alone == together
        assert len(together["audits"]) == 1
        assert together["run"]["state"] == ("CANCELLED" if flag else "STOPPED")
        assert together["run"]["lease_epoch"] == 2
        assert [j["state"] for j in together["jobs"]] == ["COMPLETED", "FAILED", "FAILED", "FAILED"]
        assert [j["stop_reason"] for j in together["jobs"]][1] == "WORKER_LOST"


def test_a_run_that_spoke_up_after_the_read_is_not_ended(
    service: RunService, clock: FakeClock
) -> None:
    quiet = start_run(service, "t1")
    lively = start_run(service, "t2")
    clock.advance(31)
    horizon = service.context.policy.stale_horizon(clock.now())
    found = service.context.db.run(
        lambda c: run_store.find_ending(c, run_store.Guard(silent_since=horizon), limit=10)
    )
    assert {c.id for c in found} == {quiet, lively}
    service.worker.heartbeat(tenant_id="t2", run_id=lively, lease_epoch=1, caller=WORKER)

    ended = service.context.transact(
        lambda conn, now, notes: service.context.end_lost(
            conn,
            notes,
            found + found,  # a run named twice still ends once
            now=now,
            silent_since=horizon,
            reason=StopReason.HEARTBEAT_TIMEOUT,
            detected_by="reaper",
            caller=REAPER,
        ),
        caller=REAPER,
    )
    assert [e.run_id for e in ended] == [quiet]
    assert snapshot(service, lively)["run"]["state"] == "RUNNING"
    assert snapshot(service, lively)["audits"] == []
    assert len(snapshot(service, quiet)["audits"]) == 1


def test_the_reaper_ends_every_stale_run_batch_by_batch(
    service: RunService, clock: FakeClock
) -> None:
    stale = [start_run(service, f"s{i}", cancel=i % 3 == 0) for i in range(7)]
    clock.advance(20)
    fresh = start_run(service, "fresh")
    clock.advance(11)  # the first seven are 31 s silent, the last 11 s

    # Seven of eight silent at once trips the breaker: nothing stops.
    held = Reaper(service.context, batch_size=3).pass_once()
    assert held.total == 0 and held.held_back == 7
    assert snapshot(service, stale[0])["run"]["state"] == "RUNNING"

    service.context.policy = replace(service.context.policy, breaker_share=1.0)
    report = Reaper(service.context, batch_size=3).pass_once()

    assert report.ended == {"HEARTBEAT_TIMEOUT": 4, "CANCELLED_BY_USER": 3}
    for run_id in stale:
        assert len(snapshot(service, run_id)["audits"]) == 1
    assert snapshot(service, fresh)["run"]["state"] == "RUNNING"
    assert Reaper(service.context, batch_size=3).pass_once().total == 0


def test_unacknowledged_cancels_end_in_one_batch(service: RunService, clock: FakeClock) -> None:
    cancelled = [start_run(service, f"c{i}", cancel=True) for i in range(3)]
    for _ in range(3):
        # The workers keep heartbeating: only the cancel grace can end these runs.
        clock.advance(20)
        for j, other in enumerate(cancelled):
            service.worker.heartbeat(tenant_id=f"c{j}", run_id=other, lease_epoch=1, caller=WORKER)
    clock.advance(25)

    report = Reaper(service.context).pass_once()

    assert report.ended == {"CANCEL_TIMEOUT": 3}
    for run_id in cancelled:
        shot = snapshot(service, run_id)
        assert shot["run"]["state"] == "CANCELLED"
        assert [a[4]["reason"] for a in shot["audits"]] == ["CANCEL_TIMEOUT"]
