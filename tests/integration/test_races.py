"""Exactly one terminal transition, whoever races for it.

Two replicas (two engines on one database, one shared clock) are fired at
the same running runs from many threads at once: cancels, force cancels,
heartbeats, every FinishRun outcome, job reports, reads that finalize stale
runs, and reaper passes on both replicas. After every round the tables are
read directly: each run ended once, with one audit row, one epoch bump, and
no job left queued or in progress.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import Connection, func, select

from runsvc.clock import FakeClock
from runsvc.domain import (
    TERMINAL_STATES,
    JobOutcome,
    JobResult,
    JobSpec,
    JobState,
    LivenessPolicy,
    RunOutcome,
    RunState,
)
from runsvc.errors import InvalidTransition, LeaseLost, NoActiveRun
from runsvc.reaper import Reaper
from runsvc.service import Caller, GroupCommit, RunService
from runsvc.service.backend import ForceCancelled
from runsvc.service.worker import JobNotHeld, JobsUnfinished
from runsvc.slots import SlotLimits, StoreSlots
from runsvc.store.engine import Database, make_engine
from runsvc.store.schema import audit_events, jobs, runs
from tests.conftest import BACKEND, WORKER

# 1,000 rounds (4,000 runs raced) in `make test-faults`.
ROUNDS = 1000 if os.environ.get("RUNSVC_FAULTS_FULL") == "1" else 150
TENANTS = 4
JOBS_PER_RUN = 6
ACQUIRED = 2
# The last tenant's run holds only the jobs its worker takes, so that a report
# landing before FinishRun(COMPLETED) lets that outcome win too.
SMALL_RUN_JOBS = ACQUIRED
JOIN_TIMEOUT = 60.0
SEED = 20260101

# Ends what the race left running; its endings are not counted as winners.
CLEANUP = Caller(subject="race-cleanup", role="operator")

FINISH_OUTCOMES = {
    "finish_cancelled": RunOutcome.CANCELLED,
    "finish_failed": RunOutcome.FAILED,
    "finish_completed": RunOutcome.COMPLETED,
}

# What each call may be refused with when it loses the race; anything else fails.
EXPECTED: dict[str, tuple[type[BaseException], ...]] = {
    "cancel": (InvalidTransition,),
    "force_cancel": (InvalidTransition,),
    "heartbeat": (LeaseLost,),
    "finish_cancelled": (LeaseLost, JobsUnfinished),
    "finish_failed": (LeaseLost, JobsUnfinished),
    "finish_completed": (LeaseLost, JobsUnfinished),
    "report": (LeaseLost, JobNotHeld),
    "get_active": (NoActiveRun,),
    "get_run": (),
}
RUN_ACTIONS = tuple(EXPECTED)
REAPER_THREADS = 2

# The stale threshold is 30 s and the cancel grace 60 s (LivenessPolicy defaults).
MODES = {
    "fresh": 0.0,  # nothing is stale: only callers can end a run
    "stale": 31.0,  # reads and reapers may finalize too
    "cancelling": 61.0,  # cancel requested, then silent past the grace
}


@dataclass
class RaceRun:
    tenant_id: str
    run_id: str
    job_ids: list[str]
    acquired: list[str]
    replica: int


@dataclass
class Outcome:
    """What one call in the race returned, or which expected refusal it got."""

    action: str
    run: int | None
    replica: int
    result: Any = None
    refused: BaseException | None = None


@dataclass
class Round:
    number: int
    mode: str
    outcomes: list[Outcome] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class RetryCounter(logging.Handler):
    """Counts transactions the store ran again after losing a race (deadlock, lock)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("transaction lost a race"):
            self.count += 1


@pytest.fixture
def retries() -> Iterator[RetryCounter]:
    logger = logging.getLogger("runsvc.store.engine")
    counter = RetryCounter()
    level = logger.level
    logger.addHandler(counter)
    logger.setLevel(logging.DEBUG)
    yield counter
    logger.removeHandler(counter)
    logger.setLevel(level)


@pytest.fixture
def replicas(db_url: str) -> Iterator[tuple[list[RunService], FakeClock]]:
    clock = FakeClock()
    slots = StoreSlots(SlotLimits(default=5))
    policy = LivenessPolicy()
    databases = [Database(make_engine(db_url)) for _ in range(2)]
    # Replica 1 batches heartbeats, replica 0 writes one statement per heartbeat.
    services = [
        RunService(
            db=db,
            clock=clock,
            slots=slots,
            policy=policy,
            group_commit=GroupCommit(max_delay=0.001) if i == 1 else GroupCommit(max_batch=1),
        )
        for i, db in enumerate(databases)
    ]
    try:
        yield services, clock
    finally:
        for service in services:
            service.close()
        for db in databases:
            db.dispose()


def specs(n: int) -> list[JobSpec]:
    return [JobSpec(external_id=f"call-{i}", payload=f"+9725{i:07d}".encode()) for i in range(n)]


def job_ids_of(db: Database, run_id: str) -> list[str]:
    def read(conn: Connection) -> list[str]:
        return list(conn.execute(select(jobs.c.id).where(jobs.c.run_id == run_id)).scalars())

    return db.run(read)


def set_up_round(
    services: list[RunService], clock: FakeClock, number: int, mode: str, rng: random.Random
) -> list[RaceRun]:
    """Each tenant creates a run, a worker claims it (epoch 1) and takes a couple of jobs."""
    prepared: list[RaceRun] = []
    for t in range(TENANTS):
        svc = services[(number + t) % 2]
        tenant = f"tenant-{t}"
        size = SMALL_RUN_JOBS if t == TENANTS - 1 else JOBS_PER_RUN
        run = svc.backend.create_run(
            tenant_id=tenant, request_id=f"round-{number}", jobs=specs(size), caller=BACKEND
        )
        claim = services[(number + t + 1) % 2].worker.claim_run(
            tenant_id=tenant, worker_id=f"worker-{number}-{t}", caller=WORKER
        )
        assert claim is not None and claim.run.id == run.id
        assert claim.lease_epoch == 1 and not claim.resumed
        taken = svc.worker.acquire_jobs(
            tenant_id=tenant, run_id=run.id, lease_epoch=1, max_jobs=ACQUIRED, caller=WORKER
        )
        assert len(taken.jobs) == ACQUIRED
        prepared.append(
            RaceRun(
                tenant,
                run.id,
                job_ids_of(svc.context.db, run.id),
                [j.id for j in taken.jobs],
                rng.randrange(2),
            )
        )
    if mode == "cancelling":
        for race_run in prepared:
            services[race_run.replica].backend.cancel(
                tenant_id=race_run.tenant_id, run_id=race_run.run_id, reason="stop", caller=BACKEND
            )
    clock.advance(MODES[mode])
    return prepared


def call(svc: RunService, action: str, run: RaceRun) -> Any:
    tenant, run_id = run.tenant_id, run.run_id
    if action == "cancel":
        return svc.backend.cancel(tenant_id=tenant, run_id=run_id, reason="race", caller=BACKEND)
    if action == "force_cancel":
        return svc.backend.force_cancel(
            tenant_id=tenant, run_id=run_id, reason="race", caller=BACKEND
        )
    if action == "heartbeat":
        return svc.worker.heartbeat(tenant_id=tenant, run_id=run_id, lease_epoch=1, caller=WORKER)
    if action in FINISH_OUTCOMES:
        return svc.worker.finish_run(
            tenant_id=tenant,
            run_id=run_id,
            lease_epoch=1,
            outcome=FINISH_OUTCOMES[action],
            error=None,
            caller=WORKER,
        )
    if action == "report":
        return svc.worker.report_jobs(
            tenant_id=tenant,
            run_id=run_id,
            lease_epoch=1,
            results=[JobResult(job_id, JobOutcome.COMPLETED) for job_id in run.acquired],
            caller=WORKER,
        )
    if action == "get_active":
        return svc.backend.get_active(tenant_id=tenant, caller=BACKEND)
    if action == "get_run":
        return svc.backend.get_run(tenant_id=tenant, run_id=run_id, caller=BACKEND)
    raise AssertionError(f"unknown action {action}")


Step = Callable[[], None]


def race(
    services: list[RunService], race_runs: list[RaceRun], rnd: Round, rng: random.Random
) -> None:
    """Start every thread at one barrier; each fires one kind of call at the runs."""

    def record(outcome: Outcome) -> None:
        with rnd.lock:
            rnd.outcomes.append(outcome)

    def fail(label: str) -> None:
        with rnd.lock:
            rnd.errors.append(f"{label}:\n{traceback.format_exc()}")

    def run_step(action: str, index: int, replica: int) -> Step:
        def step() -> None:
            label = f"{action} run={index} replica={replica}"
            try:
                result = call(services[replica], action, race_runs[index])
            except EXPECTED[action] as refused:
                record(Outcome(action, index, replica, refused=refused))
            except BaseException:
                fail(label)
            else:
                record(Outcome(action, index, replica, result=result))

        return step

    def reaper_step(replica: int) -> Step:
        reaper = Reaper(services[replica].context)

        def step() -> None:
            try:
                report = reaper.pass_once()
            except BaseException:
                fail(f"reaper replica={replica}")
            else:
                record(Outcome("reaper", None, replica, result=report))

        return step

    plans: list[tuple[str, list[Step]]] = []
    for action in RUN_ACTIONS:
        order = list(range(len(race_runs)))
        rng.shuffle(order)
        # Leave out a call now and then, so that every kind of ending gets its chance.
        steps = [run_step(action, i, rng.randrange(2)) for i in order if rng.random() < 0.85]
        plans.append((action, steps))
    for replica in range(REAPER_THREADS):
        plans.append((f"reaper-{replica}", [reaper_step(replica % 2)]))

    barrier = threading.Barrier(len(plans), timeout=JOIN_TIMEOUT)

    def worker(label: str, steps: list[Step]) -> None:
        try:
            barrier.wait()
        except BaseException:
            fail(f"{label} at the barrier")
            return
        for step in steps:
            step()

    threads = [
        threading.Thread(target=worker, args=plan, name=f"race-{plan[0]}", daemon=True)
        for plan in plans
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT)
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"round {rnd.number} ({rnd.mode}): threads still running: {stuck}"


def end_leftovers(services: list[RunService], race_runs: list[RaceRun]) -> None:
    """A run nothing ended (every ending call was left out or refused) is ended now."""
    for race_run in race_runs:
        svc = services[0]
        run = svc.backend.get_run(
            tenant_id=race_run.tenant_id, run_id=race_run.run_id, caller=CLEANUP
        )
        if run.state is RunState.RUNNING:
            svc.backend.force_cancel(
                tenant_id=race_run.tenant_id,
                run_id=race_run.run_id,
                reason="cleanup",
                caller=CLEANUP,
            )


Rows = dict[str, list[Any]]


def read_tables(conn: Connection, run_ids: list[str]) -> tuple[dict[str, Any], Rows, Rows]:
    run_rows = {r.id: r for r in conn.execute(select(runs).where(runs.c.id.in_(run_ids)))}
    job_rows: Rows = {run_id: [] for run_id in run_ids}
    for r in conn.execute(select(jobs).where(jobs.c.run_id.in_(run_ids))):
        job_rows[r.run_id].append(r)
    ended: Rows = {run_id: [] for run_id in run_ids}
    for r in conn.execute(
        select(audit_events).where(
            audit_events.c.run_id.in_(run_ids), audit_events.c.action == "RUN_ENDED"
        )
    ):
        ended[r.run_id].append(r)
    return run_rows, job_rows, ended


def check_round(
    services: list[RunService], race_runs: list[RaceRun], rnd: Round, winners: Counter[str]
) -> None:
    where = f"round {rnd.number} ({rnd.mode})"
    run_ids = [r.run_id for r in race_runs]
    run_rows, job_rows, ended = services[1].context.db.run(lambda c: read_tables(c, run_ids))
    terminal = {s.value for s in TERMINAL_STATES}
    finished_states = {JobState.COMPLETED.value, JobState.FAILED.value}
    for index, race_run in enumerate(race_runs):
        here = f"{where}, run {index} ({race_run.tenant_id})"
        row = run_rows[race_run.run_id]
        assert row.state in terminal, f"{here}: run is {row.state}"
        assert row.lease_epoch == 2, f"{here}: lease_epoch {row.lease_epoch} (claim + one ending)"
        assert row.ended_at is not None and row.worker_id is None, here

        audits = ended[race_run.run_id]
        assert len(audits) == 1, f"{here}: {len(audits)} RUN_ENDED audit rows: {audits}"
        detail = json.loads(audits[0].detail)
        assert detail["state"] == row.state, f"{here}: audit says {detail}, run is {row.state}"
        if audits[0].actor != CLEANUP.subject:
            winners[f"{detail['detected_by']}:{detail['state']}:{detail['reason']}"] += 1

        found = job_rows[race_run.run_id]
        assert sorted(j.id for j in found) == sorted(race_run.job_ids), f"{here}: jobs changed"
        states = {j.id: j.state for j in found}
        unfinished = {i: s for i, s in states.items() if s not in finished_states}
        assert not unfinished, f"{here}: jobs left unfinished: {unfinished}"
        if row.state == RunState.COMPLETED.value:
            assert set(states.values()) == {JobState.COMPLETED.value}, f"{here}: {states}"

    for outcome in rnd.outcomes:
        if outcome.run is None:
            continue
        race_run = race_runs[outcome.run]
        here = f"{where}, run {outcome.run}: {outcome.action} on replica {outcome.replica}"
        row = run_rows[race_run.run_id]
        states = {j.id: j for j in job_rows[race_run.run_id]}
        if outcome.action == "force_cancel" and outcome.refused is None:
            forced: ForceCancelled = outcome.result
            assert row.state == RunState.CANCELLED.value, (
                f"{here} returned {forced}, run is {row.state}"
            )
        if outcome.action in FINISH_OUTCOMES and outcome.refused is None:
            wanted = {"finish_cancelled": "CANCELLED", "finish_failed": "FAILED"}.get(
                outcome.action, "COMPLETED"
            )
            assert row.state == wanted, f"{here} succeeded, run is {row.state}"
        if outcome.action == "report" and not isinstance(outcome.refused, JobNotHeld):
            # On time, or late (LeaseLost after recording): the results are kept either way.
            late = outcome.refused is not None
            for job_id in race_run.acquired:
                job = states[job_id]
                assert (job.state, bool(job.late)) == (JobState.COMPLETED.value, late), (
                    f"{here} ({outcome.refused!r}): job {job_id} is {job.state}, late={job.late}"
                )

    in_progress = services[0].context.db.run(
        lambda c: c.execute(
            select(func.count()).where(jobs.c.state == JobState.IN_PROGRESS.value)
        ).scalar_one()
    )
    assert in_progress == 0, f"{where}: {in_progress} jobs still hold a slot"


def test_every_run_ends_exactly_once_under_racing_replicas(
    replicas: tuple[list[RunService], FakeClock], retries: RetryCounter
) -> None:
    services, clock = replicas
    rng = random.Random(SEED)
    winners: Counter[str] = Counter()
    modes = list(MODES)
    for number in range(ROUNDS):
        rnd = Round(number, modes[number % len(modes)])
        race_runs = set_up_round(services, clock, number, rnd.mode, rng)
        race(services, race_runs, rnd, rng)
        assert not rnd.errors, f"round {number} ({rnd.mode}) failed:\n" + "\n".join(rnd.errors)
        end_leftovers(services, race_runs)
        check_round(services, race_runs, rnd, winners)
        clock.advance(1)

    total = services[0].context.db.run(
        lambda c: c.execute(
            select(func.count())
            .select_from(audit_events)
            .where(audit_events.c.action == "RUN_ENDED")
        ).scalar_one()
    )
    assert total == ROUNDS * TENANTS
    print(f"\nwinners: {dict(sorted(winners.items()))}; store retries: {retries.count}")
    assert len(winners) > 1, f"only one kind of ending ever won: {winners}"
    enders = {kind.split(":")[0] for kind in winners}
    assert {"worker", "force_cancel"} <= enders and enders & {"read", "reaper"}, winners
