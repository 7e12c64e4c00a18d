"""What workers do: claim a run, heartbeat it, take jobs, report results, finish.

Every call but ClaimRun carries the lease epoch and is fenced by it inside
the statement that writes; a successful fenced call also counts as a
heartbeat, since it proves the worker alive.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection

from runsvc.domain import (
    FINISH_EVENTS,
    HeldSlot,
    JobResult,
    Run,
    RunOutcome,
    StopReason,
    grant_token,
    holds_lease,
    target,
)
from runsvc.errors import (
    MAX_VIOLATIONS,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    LeaseLost,
    PermissionDenied,
)
from runsvc.service.acquire import Acquired, JobTaking, Wanted
from runsvc.service.context import Caller, Context, Ending, Notes, lease_lost
from runsvc.service.heartbeats import Heartbeats
from runsvc.store import jobs as job_store
from runsvc.store import runs as run_store
from runsvc.validation import Checker, Limits, check_results

_CLAIM_ATTEMPTS = 5

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    run: Run
    lease_epoch: int
    resumed: bool


@dataclass(frozen=True)
class HeartbeatAck:
    cancel_requested: bool
    stale_time: datetime


@dataclass(frozen=True)
class Reported:
    recorded: int
    duplicates: int
    late: bool


class JobsUnfinished(FailedPrecondition):
    """The run still has queued or in-progress jobs; report them or finish as failed."""

    reason = "JOBS_UNFINISHED"


class JobNotHeld(FailedPrecondition):
    """A result names a job that this lease did not take."""

    reason = "JOB_NOT_HELD"


_FINISH_REASONS: dict[RunOutcome, StopReason | None] = {
    RunOutcome.COMPLETED: None,
    RunOutcome.FAILED: StopReason.WORKER_FAILED,
    RunOutcome.CANCELLED: StopReason.CANCELLED_BY_USER,
}


class WorkerUseCases:
    def __init__(
        self, ctx: Context, limits: Limits, heartbeats: Heartbeats, taking: JobTaking
    ) -> None:
        self._ctx = ctx
        self._limits = limits
        self.heartbeats = heartbeats
        self._taking = taking

    def claim_run(self, *, tenant_id: str | None, worker_id: str, caller: Caller) -> Claim | None:
        check = Checker()
        check.identifier("worker_id", worker_id, max_length=self._limits.max_id_length)
        check.done()
        if not holds_lease(caller.worker, worker_id):
            raise PermissionDenied("the caller may not act as this worker")

        def work(conn: Connection, now: datetime, notes: Notes) -> Claim | None:
            lease = run_store.resume_held(conn, tenant_id=tenant_id, worker_id=worker_id, now=now)
            resumed = lease is not None
            if lease is not None:
                # The crashed incarnation's jobs have an unknown outcome: they
                # fail as WORKER_LOST, and a late result from it is still kept.
                freed = job_store.fail_in_progress(
                    conn, [lease.run_id], tenant_id=lease.tenant_id, now=now
                )
                self._ctx.release_slots(
                    conn,
                    notes,
                    tenant_id=lease.tenant_id,
                    run_id=lease.run_id,
                    slots=freed.get(lease.run_id, []),
                    cause="resume",
                    now=now,
                )
            else:
                for _ in range(_CLAIM_ATTEMPTS):
                    lease = run_store.claim_pending(
                        conn, tenant_id=tenant_id, worker_id=worker_id, now=now
                    )
                    if lease is not None:
                        break
            if lease is None:
                return None
            run = run_store.get(conn, lease.run_id, tenant_id=tenant_id)
            assert run is not None
            return Claim(run, lease.lease_epoch, resumed)

        claim = self._ctx.transact(work, caller=caller)
        if claim is not None:
            # After the commit: who holds which run now is what an operator asks first.
            log.info(
                "run resumed" if claim.resumed else "run claimed",
                extra={
                    "run_id": claim.run.id,
                    "run_number": claim.run.number,
                    "tenant_id": claim.run.tenant_id,
                    "worker_id": worker_id,
                    "lease_epoch": claim.lease_epoch,
                },
            )
        return claim

    def _check_lease(self, run_id: str, lease_epoch: int) -> Checker:
        check = Checker()
        check.object_id("run_id", run_id)
        check.lease_epoch("lease_epoch", lease_epoch)
        return check

    def _touch_lease(
        self,
        conn: Connection,
        run_id: str,
        tenant_id: str | None,
        lease_epoch: int,
        caller: Caller,
        now: datetime,
    ) -> run_store.Touched | None:
        """Record a sign of life from the caller's lease; None if it does not hold it."""
        touch = run_store.LeaseTouch(run_id, tenant_id, lease_epoch, worker=caller.worker)
        return next(iter(run_store.touch_leases(conn, [touch], now=now)), None)

    def heartbeat(
        self, *, tenant_id: str | None, run_id: str, lease_epoch: int, caller: Caller
    ) -> HeartbeatAck:
        self._check_lease(run_id, lease_epoch).done()
        beat = self.heartbeats.record(
            run_store.LeaseTouch(run_id, tenant_id, lease_epoch, worker=caller.worker),
            caller=caller,
        )
        self._ctx.observer.heartbeat()
        return HeartbeatAck(beat.touched.cancel_requested, self._ctx.policy.stale_time(beat.now))

    def acquire_jobs(
        self,
        *,
        tenant_id: str | None,
        run_id: str,
        lease_epoch: int,
        max_jobs: int,
        request_id: str = "",
        caller: Caller,
    ) -> Acquired:
        check = self._check_lease(run_id, lease_epoch)
        check.count("max_jobs", max_jobs, low=1, high=self._limits.max_jobs_per_acquire)
        if request_id:
            check.identifier("request_id", request_id, max_length=self._limits.max_id_length)
        check.done()

        def hold(conn: Connection, now: datetime) -> run_store.Touched:
            touched = self._touch_lease(conn, run_id, tenant_id, lease_epoch, caller, now)
            if touched is None:  # raise why: the run is not visible, or its lease is gone
                visible = self._ctx.leased_run(
                    conn, run_id, tenant_id=tenant_id, worker=caller.worker
                )
                raise lease_lost(visible, lease_epoch)
            return touched

        wanted = Wanted(
            run_id, lease_epoch, max_jobs, caller, hold, grant_token(request_id), bool(request_id)
        )
        return self._taking.acquire(self._ctx, wanted)

    def report_jobs(
        self,
        *,
        tenant_id: str | None,
        run_id: str,
        lease_epoch: int,
        results: Sequence[JobResult],
        caller: Caller,
    ) -> Reported:
        check = self._check_lease(run_id, lease_epoch)
        check_results(check, results, self._limits)
        check.done()

        def work(conn: Connection, now: datetime, notes: Notes) -> Reported:
            row = self._touch_lease(conn, run_id, tenant_id, lease_epoch, caller, now)
            late = row is None
            if row is not None:
                run_tenant = row.tenant_id
            else:  # not visible raises; a visible run whose lease ended takes late results
                visible = self._ctx.leased_run(
                    conn, run_id, tenant_id=tenant_id, worker=caller.worker
                )
                run_tenant = visible.tenant_id
            return self._record(conn, notes, run_id, run_tenant, lease_epoch, results, late, now)

        reported = self._ctx.transact(work, caller=caller)
        if reported.late:
            self._ctx.observer.lease_lost()
            raise LeaseLost(
                "the lease on this run is no longer held; late results were recorded",
                metadata={"run_id": run_id, "recorded_late": str(reported.recorded)},
            )
        return reported

    def _record(
        self,
        conn: Connection,
        notes: Notes,
        run_id: str,
        tenant_id: str,
        lease_epoch: int,
        results: Sequence[JobResult],
        late: bool,
        now: datetime,
    ) -> Reported:
        held = job_store.held_by_run(conn, run_id, [r.job_id for r in results], tenant_id=tenant_id)
        unknown = [
            FieldViolation(f"results[{i}].job_id", "no such job in this run")
            for i, r in enumerate(results)
            if r.job_id not in held
        ]
        if unknown:
            raise InvalidArgument(unknown)
        recorded = duplicates = 0
        not_held: list[str] = []
        freed: list[HeldSlot] = []
        for result in sorted(results, key=lambda r: r.job_id):
            slot = job_store.record_result(
                conn,
                result.job_id,
                tenant_id=tenant_id,
                run_id=run_id,
                lease_epoch=lease_epoch,
                outcome=result.outcome,
                error=result.error,
                late=late,
                now=now,
            )
            if slot is not None:
                recorded += 1
                if not late:
                    freed.append(slot)
                continue
            job = held[result.job_id]
            if job.lease_epoch == lease_epoch and job.state.value == result.outcome.value:
                duplicates += 1
            else:
                not_held.append(result.job_id)
        if not_held:
            # Bounded like every error reply (runsvc.errors.MAX_VIOLATIONS): the first ids and
            # how many in all, never a trailer larger than a client reads.
            raise JobNotHeld(
                f"{len(not_held)} result(s) name jobs this lease did not take",
                metadata={
                    "job_ids": ",".join(not_held[:MAX_VIOLATIONS]),
                    "job_count": str(len(not_held)),
                },
            )
        self._ctx.release_slots(
            conn, notes, tenant_id=tenant_id, run_id=run_id, slots=freed, cause="report", now=now
        )
        return Reported(recorded, duplicates, late)

    def finish_run(
        self,
        *,
        tenant_id: str | None,
        run_id: str,
        lease_epoch: int,
        outcome: RunOutcome,
        error: str | None,
        caller: Caller,
    ) -> Run:
        check = self._check_lease(run_id, lease_epoch)
        check.text("error", error or "", max_length=self._limits.max_text_length)
        check.done()
        event = FINISH_EVENTS[outcome]

        def work(conn: Connection, now: datetime, notes: Notes) -> Run:
            ending = Ending(
                event,
                _FINISH_REASONS[outcome],
                run_store.Guard(
                    lease_epoch=lease_epoch,
                    worker=caller.worker,
                    nothing_unfinished=outcome is RunOutcome.COMPLETED,
                ),
                tag="RUN_ENDED",
                detected_by="worker",
                caller=caller,
                error=error or None,
            )
            ended = self._ctx.end_runs(conn, notes, [run_id], ending, tenant_id=tenant_id, now=now)
            run = self._ctx.leased_run(conn, run_id, tenant_id=tenant_id, worker=caller.worker)
            if ended:
                return run
            # A retried FinishRun whose first answer was lost: the run already
            # ended as asked, one epoch on (finalizing bumps the epoch once).
            if run.lease_epoch == lease_epoch + 1 and run.state is target(event):
                return run
            if (
                run.lease_epoch == lease_epoch
                and run.job_counts.queued + run.job_counts.in_progress
            ):
                raise JobsUnfinished(
                    metadata={
                        "queued": str(run.job_counts.queued),
                        "in_progress": str(run.job_counts.in_progress),
                    }
                )
            raise lease_lost(run, lease_epoch)

        return self._ctx.transact(work, caller=caller)
