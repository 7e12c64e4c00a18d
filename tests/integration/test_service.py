"""The store and its rules, through the use cases, on SQLite and PostgreSQL alike."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import Connection, select, update

from runsvc.clock import FakeClock
from runsvc.domain import JobOutcome, JobResult, JobSpec, JobState, RunOutcome, RunState
from runsvc.errors import (
    ActiveRunExists,
    InvalidArgument,
    InvalidTransition,
    LeaseLost,
    NoActiveRun,
    RunNotVisible,
)
from runsvc.reaper import Reaper
from runsvc.service import RunService
from runsvc.service.worker import Claim, JobNotHeld, JobsUnfinished
from runsvc.store.engine import Database
from runsvc.store.schema import audit_events, jobs, runs
from tests.conftest import BACKEND, WORKER


def specs(n: int) -> list[JobSpec]:
    return [
        JobSpec(external_id=f"call-{i}", payload=f"+97250000{i:04d}".encode()) for i in range(n)
    ]


def create(service: RunService, tenant: str = "t1", n: int = 5, request_id: str = "r1") -> str:
    run = service.backend.create_run(
        tenant_id=tenant, request_id=request_id, jobs=specs(n), caller=BACKEND
    )
    return run.id


def claim(service: RunService, tenant: str | None = "t1", worker: str = "w1") -> Claim:
    claimed = service.worker.claim_run(tenant_id=tenant, worker_id=worker, caller=WORKER)
    assert claimed is not None
    return claimed


def job_rows(database: Database, run_id: str) -> list[dict[str, object]]:
    def read(conn: Connection) -> list[dict[str, object]]:
        rows = conn.execute(select(jobs).where(jobs.c.run_id == run_id).order_by(jobs.c.seq))
        return [dict(r._mapping) for r in rows]

    return database.run(read)


def ended_audits(database: Database, run_id: str) -> list[dict[str, object]]:
    def read(conn: Connection) -> list[dict[str, object]]:
        rows = conn.execute(
            select(audit_events).where(
                audit_events.c.run_id == run_id, audit_events.c.action == "RUN_ENDED"
            )
        )
        return [dict(r._mapping) for r in rows]

    return database.run(read)


# --- creating runs ---------------------------------------------------------


def test_create_makes_a_pending_run_with_queued_jobs(service: RunService) -> None:
    run = service.backend.create_run(tenant_id="t1", request_id="r1", jobs=specs(4), caller=BACKEND)
    assert run.state is RunState.PENDING
    assert run.tenant_id == "t1"
    assert run.lease_epoch == 0
    assert (run.job_counts.total, run.job_counts.queued) == (4, 4)


def test_create_is_idempotent_on_request_id(service: RunService) -> None:
    first = create(service)
    again = create(service)
    assert first == again
    assert (
        service.backend.get_run(tenant_id="t1", run_id=first, caller=BACKEND).job_counts.total == 5
    )


def test_one_active_run_per_tenant(service: RunService) -> None:
    first = create(service)
    with pytest.raises(ActiveRunExists) as refused:
        create(service, request_id="r2")
    assert refused.value.run_id == first
    create(service, tenant="t2", request_id="r2")  # another tenant is not affected
    service.backend.force_cancel(tenant_id="t1", run_id=first, reason="", caller=BACKEND)
    assert create(service, request_id="r3") != first


@pytest.mark.parametrize(
    ("request_id", "jobs", "field"),
    [
        ("", specs(1), "request_id"),
        ("r", [], "jobs"),
        ("r", [JobSpec("a", b""), JobSpec("a", b"")], "jobs[1].external_id"),
        ("r", [JobSpec("", b"")], "jobs[0].external_id"),
        ("r", [JobSpec("a", b"x" * (64 * 1024 + 1))], "jobs[0].payload"),
    ],
)
def test_bad_create_is_refused_and_changes_nothing(
    service: RunService, database: Database, request_id: str, jobs: list[JobSpec], field: str
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        service.backend.create_run(tenant_id="t1", request_id=request_id, jobs=jobs, caller=BACKEND)
    assert field in [v.field for v in refused.value.violations]
    assert database.run(lambda c: c.execute(select(runs.c.id)).all()) == []


# --- claiming, heartbeats, fencing ------------------------------------------


def test_claim_takes_the_oldest_pending_run_of_the_workers_tenant(
    service: RunService, clock: FakeClock
) -> None:
    older = create(service, tenant="t1")
    clock.advance(1)
    create(service, tenant="t2", request_id="r2")
    assert service.worker.claim_run(tenant_id="t3", worker_id="w", caller=WORKER) is None
    claimed = claim(service, tenant=None, worker="fleet")
    assert claimed.run.id == older
    assert claimed.run.state is RunState.RUNNING
    assert claimed.run.worker_id == "fleet"
    assert claimed.lease_epoch == 1 and not claimed.resumed
    assert claim(service, tenant="t2", worker="w2").run.tenant_id == "t2"


def test_resume_after_crash_fences_the_old_incarnation(
    service: RunService, database: Database
) -> None:
    create(service)
    first = claim(service)
    taken = service.worker.acquire_jobs(
        tenant_id="t1", run_id=first.run.id, lease_epoch=1, max_jobs=2, caller=WORKER
    )
    again = claim(service)
    assert again.resumed and again.run.id == first.run.id and again.lease_epoch == 2
    states = {r["id"]: (r["state"], r["stop_reason"]) for r in job_rows(database, first.run.id)}
    for job in taken.jobs:
        assert states[job.id] == ("FAILED", "WORKER_LOST")
    with pytest.raises(LeaseLost):
        service.worker.heartbeat(tenant_id="t1", run_id=first.run.id, lease_epoch=1, caller=WORKER)
    service.worker.heartbeat(tenant_id="t1", run_id=first.run.id, lease_epoch=2, caller=WORKER)


def test_heartbeat_moves_the_stale_time_and_carries_cancel(
    service: RunService, clock: FakeClock
) -> None:
    create(service)
    c = claim(service)
    clock.advance(20)
    ack = service.worker.heartbeat(tenant_id="t1", run_id=c.run.id, lease_epoch=1, caller=WORKER)
    assert ack.stale_time == clock.now() + timedelta(seconds=30)
    assert not ack.cancel_requested
    service.backend.cancel(tenant_id="t1", run_id=c.run.id, reason="user", caller=BACKEND)
    ack = service.worker.heartbeat(tenant_id="t1", run_id=c.run.id, lease_epoch=1, caller=WORKER)
    assert ack.cancel_requested


def test_worker_calls_with_a_bad_lease_are_refused(service: RunService) -> None:
    create(service)
    c = claim(service)
    with pytest.raises(LeaseLost) as lost:
        service.worker.heartbeat(tenant_id="t1", run_id=c.run.id, lease_epoch=7, caller=WORKER)
    assert lost.value.reason == "LEASE_LOST"
    with pytest.raises(InvalidArgument):
        service.worker.heartbeat(tenant_id="t1", run_id="nope", lease_epoch=1, caller=WORKER)


# --- jobs and slots ----------------------------------------------------------


def test_acquire_never_exceeds_the_tenants_slots(service: RunService) -> None:
    create(service, n=10)
    c = claim(service)
    first = service.worker.acquire_jobs(
        tenant_id="t1", run_id=c.run.id, lease_epoch=1, max_jobs=10, caller=WORKER
    )
    assert len(first.jobs) == 3 and first.free_slots == 0
    assert [j.external_id for j in first.jobs] == ["call-0", "call-1", "call-2"]
    none = service.worker.acquire_jobs(
        tenant_id="t1", run_id=c.run.id, lease_epoch=1, max_jobs=10, caller=WORKER
    )
    assert none.jobs == []
    service.worker.report_jobs(
        tenant_id="t1",
        run_id=c.run.id,
        lease_epoch=1,
        results=[JobResult(first.jobs[0].id, JobOutcome.COMPLETED)],
        caller=WORKER,
    )
    more = service.worker.acquire_jobs(
        tenant_id="t1", run_id=c.run.id, lease_epoch=1, max_jobs=10, caller=WORKER
    )
    assert [j.external_id for j in more.jobs] == ["call-3"]


def test_report_is_idempotent_and_refuses_jobs_it_does_not_hold(
    service: RunService, database: Database
) -> None:
    create(service)
    c = claim(service)
    got = service.worker.acquire_jobs(
        tenant_id="t1", run_id=c.run.id, lease_epoch=1, max_jobs=1, caller=WORKER
    )
    result = JobResult(got.jobs[0].id, JobOutcome.FAILED, "busy")
    first = service.worker.report_jobs(
        tenant_id="t1", run_id=c.run.id, lease_epoch=1, results=[result], caller=WORKER
    )
    again = service.worker.report_jobs(
        tenant_id="t1", run_id=c.run.id, lease_epoch=1, results=[result], caller=WORKER
    )
    assert (first.recorded, first.duplicates, again.recorded, again.duplicates) == (1, 0, 0, 1)
    queued = next(r for r in job_rows(database, c.run.id) if r["state"] == "QUEUED")
    with pytest.raises(JobNotHeld):
        service.worker.report_jobs(
            tenant_id="t1",
            run_id=c.run.id,
            lease_epoch=1,
            results=[JobResult(str(queued["id"]), JobOutcome.COMPLETED)],
            caller=WORKER,
        )
    with pytest.raises(InvalidArgument):
        service.worker.report_jobs(
            tenant_id="t1",
            run_id=c.run.id,
            lease_epoch=1,
            results=[JobResult("00000000-0000-0000-0000-000000000000", JobOutcome.COMPLETED)],
            caller=WORKER,
        )
    assert [r["state"] for r in job_rows(database, c.run.id)].count("QUEUED") == 4


def run_to_completion(service: RunService, run_id: str, epoch: int = 1) -> None:
    while True:
        got = service.worker.acquire_jobs(
            tenant_id="t1", run_id=run_id, lease_epoch=epoch, max_jobs=10, caller=WORKER
        )
        if not got.jobs:
            return
        service.worker.report_jobs(
            tenant_id="t1",
            run_id=run_id,
            lease_epoch=epoch,
            results=[JobResult(j.id, JobOutcome.COMPLETED) for j in got.jobs],
            caller=WORKER,
        )


def test_finish_completed_needs_every_result_and_is_idempotent(
    service: RunService, database: Database
) -> None:
    create(service)
    c = claim(service)

    def finish() -> object:
        return service.worker.finish_run(
            tenant_id="t1",
            run_id=c.run.id,
            lease_epoch=1,
            outcome=RunOutcome.COMPLETED,
            error=None,
            caller=WORKER,
        )

    with pytest.raises(JobsUnfinished):
        finish()
    run_to_completion(service, c.run.id)
    done = finish()
    assert done == finish()  # a retried finish answers the same
    run = service.backend.get_run(tenant_id="t1", run_id=c.run.id, caller=BACKEND)
    assert run.state is RunState.COMPLETED and run.worker_id is None and run.end_time
    assert run.job_counts.completed == 5
    assert len(ended_audits(database, c.run.id)) == 1
    with pytest.raises(NoActiveRun):
        service.backend.get_active(tenant_id="t1", caller=BACKEND)


def test_finish_failed_fails_what_is_left(service: RunService, database: Database) -> None:
    create(service)
    c = claim(service)
    service.worker.acquire_jobs(
        tenant_id="t1", run_id=c.run.id, lease_epoch=1, max_jobs=2, caller=WORKER
    )
    run = service.worker.finish_run(
        tenant_id="t1",
        run_id=c.run.id,
        lease_epoch=1,
        outcome=RunOutcome.FAILED,
        error="carrier down",
        caller=WORKER,
    )
    assert run.state is RunState.FAILED and run.stop_reason == "WORKER_FAILED"
    reasons = sorted(str(r["stop_reason"]) for r in job_rows(database, c.run.id))
    assert reasons == ["WORKER_FAILED"] * 3 + ["WORKER_LOST"] * 2


# --- liveness ---------------------------------------------------------------


def test_a_silent_run_is_finalized_on_read(
    service: RunService, clock: FakeClock, database: Database
) -> None:
    create(service)
    c = claim(service)
    service.worker.acquire_jobs(
        tenant_id="t1", run_id=c.run.id, lease_epoch=1, max_jobs=1, caller=WORKER
    )
    clock.advance(29)
    service.worker.heartbeat(tenant_id="t1", run_id=c.run.id, lease_epoch=1, caller=WORKER)
    clock.advance(29)
    assert service.backend.get_active(tenant_id="t1", caller=BACKEND).id == c.run.id
    clock.advance(1.5)
    with pytest.raises(NoActiveRun):
        service.backend.get_active(tenant_id="t1", caller=BACKEND)
    run = service.backend.get_run(tenant_id="t1", run_id=c.run.id, caller=BACKEND)
    assert (run.state, run.stop_reason) == (RunState.STOPPED, "HEARTBEAT_TIMEOUT")
    assert run.worker_id is None and run.end_time == clock.now()
    jobs_after = job_rows(database, c.run.id)
    assert {(r["state"], r["stop_reason"]) for r in jobs_after} == {
        ("FAILED", "WORKER_LOST"),
        ("FAILED", "HEARTBEAT_TIMEOUT"),
    }
    [audit] = ended_audits(database, c.run.id)
    assert audit["tag"] == "STALE_DETECTION"
    with pytest.raises(LeaseLost):
        service.worker.heartbeat(tenant_id="t1", run_id=c.run.id, lease_epoch=1, caller=WORKER)


def test_get_run_finalizes_a_stale_run_too(service: RunService, clock: FakeClock) -> None:
    create(service)
    c = claim(service)
    clock.advance(31)
    run = service.backend.get_run(tenant_id="t1", run_id=c.run.id, caller=BACKEND)
    assert run.state is RunState.STOPPED


def test_a_silent_run_with_a_cancel_request_ends_cancelled(
    service: RunService, clock: FakeClock
) -> None:
    create(service)
    c = claim(service)
    service.backend.cancel(tenant_id="t1", run_id=c.run.id, reason="", caller=BACKEND)
    clock.advance(31)
    report = Reaper(service.context).pass_once()
    assert report.total == 1
    run = service.backend.get_run(tenant_id="t1", run_id=c.run.id, caller=BACKEND)
    assert run.state is RunState.CANCELLED


def test_reaper_ends_only_silent_runs(service: RunService, clock: FakeClock) -> None:
    ids = [create(service, tenant=f"t{i}", request_id=f"r{i}") for i in range(3)]
    for i in range(3):
        claim(service, tenant=f"t{i}", worker=f"w{i}")
    clock.advance(20)
    service.worker.heartbeat(tenant_id="t0", run_id=ids[0], lease_epoch=1, caller=WORKER)
    clock.advance(11)
    report = Reaper(service.context, batch_size=1).pass_once()
    assert report.ended == {"HEARTBEAT_TIMEOUT": 2}
    states = [service.backend.get_run(tenant_id=None, run_id=i, caller=BACKEND).state for i in ids]
    assert states == [RunState.RUNNING, RunState.STOPPED, RunState.STOPPED]
    assert Reaper(service.context).pass_once().total == 0


def test_an_unacknowledged_cancel_ends_after_the_grace(
    service: RunService, clock: FakeClock
) -> None:
    create(service)
    c = claim(service)
    service.backend.cancel(tenant_id="t1", run_id=c.run.id, reason="", caller=BACKEND)
    for _ in range(7):  # the worker keeps heartbeating but never stops
        clock.advance(10)
        service.worker.heartbeat(tenant_id="t1", run_id=c.run.id, lease_epoch=1, caller=WORKER)
    assert Reaper(service.context).pass_once().ended == {"CANCEL_TIMEOUT": 1}
    run = service.backend.get_run(tenant_id="t1", run_id=c.run.id, caller=BACKEND)
    assert (run.state, run.stop_reason) == (RunState.CANCELLED, "CANCEL_TIMEOUT")


def _set(database: Database, run_id: str, **values: object) -> None:
    database.run(lambda c: c.execute(update(runs).where(runs.c.id == run_id).values(**values)))


def test_startup_cleanup_uses_the_seed_rules(
    service: RunService, clock: FakeClock, database: Database
) -> None:
    old_lock = create(service, tenant="a", request_id="a")
    claim(service, tenant="a", worker="wa")
    clock.advance(100)
    done = create(service, tenant="b", request_id="b", n=1)
    cb = claim(service, tenant="b", worker="wb")
    run_to_completion_for(service, "b", cb)
    busy = create(service, tenant="c", request_id="c")
    claim(service, tenant="c", worker="wc")
    fresh_done = create(service, tenant="d", request_id="d", n=1)
    cd = claim(service, tenant="d", worker="wd")
    clock.advance(250)
    # No heartbeat column (rows from before it existed): the lock time is the fallback.
    _set(database, old_lock, last_heartbeat_at=None)
    for tenant, run_id in (("c", busy), ("d", fresh_done)):
        service.worker.heartbeat(tenant_id=tenant, run_id=run_id, lease_epoch=1, caller=WORKER)
    run_to_completion_for(service, "d", cd)
    report = Reaper(service.context).startup_pass()
    assert report.ended == {"STARTUP_CLEANUP": 1, "EMPTY_QUEUE": 1}
    reasons = {
        run_id: service.backend.get_run(tenant_id=None, run_id=run_id, caller=BACKEND).stop_reason
        for run_id in (old_lock, done, busy, fresh_done)
    }
    assert reasons == {
        old_lock: "STARTUP_CLEANUP",
        done: "EMPTY_QUEUE",
        busy: None,
        fresh_done: None,
    }


def run_to_completion_for(service: RunService, tenant: str, c: Claim) -> None:
    got = service.worker.acquire_jobs(
        tenant_id=tenant, run_id=c.run.id, lease_epoch=c.lease_epoch, max_jobs=10, caller=WORKER
    )
    service.worker.report_jobs(
        tenant_id=tenant,
        run_id=c.run.id,
        lease_epoch=c.lease_epoch,
        results=[JobResult(j.id, JobOutcome.COMPLETED) for j in got.jobs],
        caller=WORKER,
    )


# --- cancel and force cancel -------------------------------------------------


def test_cancel_of_a_pending_run_ends_it_and_is_idempotent(service: RunService) -> None:
    run_id = create(service)
    first = service.backend.cancel(tenant_id="t1", run_id=run_id, reason="oops", caller=BACKEND)
    again = service.backend.cancel(tenant_id="t1", run_id=run_id, reason="", caller=BACKEND)
    assert first.state is again.state is RunState.CANCELLED
    assert first.cancel_reason == "oops" and first.job_counts.failed == 5


def test_cancel_is_cooperative_for_a_running_run(service: RunService) -> None:
    create(service)
    c = claim(service)
    run = service.backend.cancel(tenant_id="t1", run_id=c.run.id, reason="stop", caller=BACKEND)
    assert run.state is RunState.RUNNING and run.cancel_requested
    none = service.worker.acquire_jobs(
        tenant_id="t1", run_id=c.run.id, lease_epoch=1, max_jobs=5, caller=WORKER
    )
    assert none.jobs == []
    ended = service.worker.finish_run(
        tenant_id="t1",
        run_id=c.run.id,
        lease_epoch=1,
        outcome=RunOutcome.CANCELLED,
        error=None,
        caller=WORKER,
    )
    assert ended.state is RunState.CANCELLED and ended.stop_reason == "CANCELLED_BY_USER"
    assert create(service, request_id="r2") != c.run.id  # the tenant is free again


def test_cancel_of_an_ended_run_is_refused(service: RunService) -> None:
    create(service, n=1)
    c = claim(service)
    run_to_completion(service, c.run.id)
    service.worker.finish_run(
        tenant_id="t1",
        run_id=c.run.id,
        lease_epoch=1,
        outcome=RunOutcome.COMPLETED,
        error=None,
        caller=WORKER,
    )
    with pytest.raises(InvalidTransition):
        service.backend.cancel(tenant_id="t1", run_id=c.run.id, reason="", caller=BACKEND)
    with pytest.raises(InvalidTransition):
        service.backend.force_cancel(tenant_id="t1", run_id=c.run.id, reason="", caller=BACKEND)


def test_force_cancel_of_a_dead_workers_run(service: RunService, database: Database) -> None:
    create(service, n=6)
    c = claim(service)
    service.worker.acquire_jobs(
        tenant_id="t1", run_id=c.run.id, lease_epoch=1, max_jobs=2, caller=WORKER
    )
    done = service.backend.force_cancel(
        tenant_id="t1", run_id=c.run.id, reason="worker hung", caller=BACKEND
    )
    assert done.run.state is RunState.CANCELLED and done.run.stop_reason == "FORCE_CANCELLED"
    assert (done.cancelled_jobs, done.released_slots) == (6, 2)
    assert done.run.worker_id is None and done.run.lease_epoch == 2
    again = service.backend.force_cancel(tenant_id="t1", run_id=c.run.id, reason="", caller=BACKEND)
    assert (again.run.state, again.cancelled_jobs, again.released_slots) == (
        RunState.CANCELLED,
        0,
        0,
    )
    [audit] = ended_audits(database, c.run.id)
    assert audit["tag"] == "FORCE_CANCEL"
    with pytest.raises(LeaseLost):
        service.worker.heartbeat(tenant_id="t1", run_id=c.run.id, lease_epoch=1, caller=WORKER)


def test_force_cancel_of_a_pending_run(service: RunService) -> None:
    run_id = create(service)
    done = service.backend.force_cancel(tenant_id="t1", run_id=run_id, reason="", caller=BACKEND)
    assert (done.run.state, done.cancelled_jobs, done.released_slots) == (RunState.CANCELLED, 5, 0)


def test_a_late_result_is_kept_and_the_worker_told_to_stop(
    service: RunService, database: Database
) -> None:
    create(service)
    c = claim(service)
    got = service.worker.acquire_jobs(
        tenant_id="t1", run_id=c.run.id, lease_epoch=1, max_jobs=1, caller=WORKER
    )
    service.backend.force_cancel(tenant_id="t1", run_id=c.run.id, reason="", caller=BACKEND)
    with pytest.raises(LeaseLost) as lost:
        service.worker.report_jobs(
            tenant_id="t1",
            run_id=c.run.id,
            lease_epoch=1,
            results=[JobResult(got.jobs[0].id, JobOutcome.COMPLETED)],
            caller=WORKER,
        )
    assert lost.value.metadata["recorded_late"] == "1"
    [row] = [r for r in job_rows(database, c.run.id) if r["id"] == got.jobs[0].id]
    assert (row["state"], row["late"]) == ("COMPLETED", True)


# --- tenants -------------------------------------------------------------------


def test_other_tenants_cannot_see_or_touch_a_run(service: RunService, database: Database) -> None:
    run_id = create(service, tenant="t1")
    c = claim(service, tenant="t1")
    for attempt in (
        lambda: service.backend.get_run(tenant_id="t2", run_id=run_id, caller=BACKEND),
        lambda: service.backend.cancel(tenant_id="t2", run_id=run_id, reason="", caller=BACKEND),
        lambda: service.backend.force_cancel(
            tenant_id="t2", run_id=run_id, reason="", caller=BACKEND
        ),
        lambda: service.worker.heartbeat(
            tenant_id="t2", run_id=run_id, lease_epoch=c.lease_epoch, caller=WORKER
        ),
    ):
        with pytest.raises(RunNotVisible) as refused:
            attempt()
        assert str(refused.value) == str(
            RunNotVisible(run_id="00000000-0000-0000-0000-000000000000", tenant_id="t2")
        )
    run = service.backend.get_run(tenant_id="t1", run_id=run_id, caller=BACKEND)
    assert run.state is RunState.RUNNING and not run.cancel_requested
    security = database.run(
        lambda conn: conn.execute(
            select(audit_events.c.run_id, audit_events.c.tenant_id).where(
                audit_events.c.tag == "SECURITY"
            )
        ).all()
    )
    assert [tuple(r) for r in security] == [(run_id, "t2")] * 4
    with pytest.raises(NoActiveRun):
        service.backend.get_active(tenant_id="t2", caller=BACKEND)


def test_list_runs_pages_newest_first(service: RunService, clock: FakeClock) -> None:
    ids = []
    for i in range(5):
        ids.append(create(service, request_id=f"r{i}", n=1))
        service.backend.cancel(tenant_id="t1", run_id=ids[-1], reason="", caller=BACKEND)
        clock.advance(1)
    create(service, tenant="t2", request_id="x", n=1)
    seen: list[str] = []
    token = ""
    while True:
        page = service.backend.list_runs(
            tenant_id="t1", states=[], page_size=2, page_token=token, caller=BACKEND
        )
        seen += [r.id for r in page.runs]
        token = page.next_page_token
        if not token:
            break
    assert seen == ids[::-1]
    pending = service.backend.list_runs(
        tenant_id=None, states=[RunState.PENDING], page_size=0, page_token="", caller=BACKEND
    )
    assert [r.tenant_id for r in pending.runs] == ["t2"]
    with pytest.raises(InvalidArgument):
        service.backend.list_runs(
            tenant_id="t1", states=[], page_size=0, page_token="garbage!", caller=BACKEND
        )
    assert JobState.QUEUED  # the enum import is part of the contract used above
