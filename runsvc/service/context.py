"""What every use case shares: the transaction runner, the clock, and ending a run.

Ending a run is one code path for every cause (stale on read, the reaper,
startup cleanup, cancel, force cancel, finish): one guarded statement, and
only if it matched, the fan-out — unfinished jobs failed, their slots'
release recorded, audit row — in the same transaction. Recorded slot
releases are applied once the transaction has committed, never inside it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Connection

from runsvc.clock import Clock
from runsvc.domain import (
    Event,
    LivenessPolicy,
    RunState,
    StopReason,
    finalization_for_lost_run,
)
from runsvc.errors import LeaseLost, RunNotVisible
from runsvc.service.observer import NullObserver, Observer
from runsvc.slots import HeldSlot, SlotRelease, Slots
from runsvc.store import audit
from runsvc.store import jobs as job_store
from runsvc.store import runs as run_store
from runsvc.store.engine import Database
from runsvc.trust import Attempt

T = TypeVar("T")


def worker_owns(worker: str, worker_id: str) -> bool:
    """``worker_id`` is the identity ``worker`` or one of its processes (``worker/…``)."""
    return worker_id == worker or worker_id.startswith(worker + "/")


audit_log = logging.getLogger("runsvc.audit")

RUN_ENDED = "RUN_ENDED"


@dataclass
class Notes:
    """Audit log lines of one transaction, written only once it has committed."""

    lines: list[dict[str, Any]] = field(default_factory=list)
    releases: list[SlotRelease] = field(default_factory=list)
    after_commit: list[Callable[[], None]] = field(default_factory=list)

    def add(self, **fields: Any) -> None:
        self.lines.append(fields)

    def clear(self) -> None:
        self.lines.clear()
        self.releases.clear()
        self.after_commit.clear()


@dataclass(frozen=True)
class Ended:
    run_id: str
    tenant_id: str
    state: RunState
    reason: str | None
    failed_jobs: int
    released_slots: int
    release: SlotRelease | None = None


@dataclass(frozen=True)
class Caller:
    """Who asked, for the audit trail.

    ``worker`` binds a worker to its identity (its token's subject or its
    certificate's name): its lease calls act only on runs whose ``worker_id``
    is that identity or starts with it and a slash. None: not bound.
    """

    subject: str
    role: str
    worker: str | None = None


class Context:
    def __init__(
        self,
        *,
        db: Database,
        clock: Clock,
        slots: Slots,
        policy: LivenessPolicy,
        observer: Observer | None = None,
    ) -> None:
        self.db = db
        self.clock = clock
        self.slots = slots
        self.policy = policy
        self.observer: Observer = observer or NullObserver()

    def transact(self, work: Callable[[Connection, datetime, Notes], T], *, caller: Caller) -> T:
        """Run ``work(conn, now, notes)`` in one transaction; log its notes after commit.

        A refused look-up of a run (missing or another tenant's) is recorded
        as a SECURITY audit row in its own transaction, since the failed
        transaction rolls back.
        """
        notes = Notes()
        began: list[Attempt] = []

        def attempt(conn: Connection) -> T:
            notes.clear()
            now = self.clock.now(conn)
            began[:] = [self.db.trust.begin(now)]
            return work(conn, now, notes)

        try:
            result = self.db.run(attempt)
        except RunNotVisible as refused:
            self._record_refusal(refused, caller)
            raise
        except LeaseLost:
            self.observer.lease_lost()
            raise
        if began:
            self.db.trust.committed(began[0])
        for line in notes.lines:
            audit_log.info(line.pop("message"), extra={"audit": line})
            self.observer.audited(line)
        for release in notes.releases:
            release.applied = self.slots.apply_release(release)
        for action in notes.after_commit:
            action()
        return result

    def stale_horizon(self, now: datetime) -> datetime | None:
        """The stale horizon at ``now`` for this replica (None: judge nothing stale now)."""
        return self.policy.trusted_stale_horizon(now, self.db.trust.since)

    def release_slots(
        self,
        conn: Connection,
        notes: Notes,
        *,
        tenant_id: str,
        run_id: str | None,
        slots: list[HeldSlot],
        cause: str,
        now: datetime,
    ) -> SlotRelease | None:
        """Record in this transaction that these slots are free; applied after commit."""
        if not slots:
            return None
        release = self.slots.record_release(
            conn, tenant_id=tenant_id, run_id=run_id, slots=slots, cause=cause, now=now
        )
        if release is not None:
            notes.releases.append(release)
        return release

    def _record_refusal(self, refused: RunNotVisible, caller: Caller) -> None:
        """The refused look-up, told apart for operators only: another tenant's run is a
        SECURITY event, a run that exists nowhere (a typo, a stale link) is not. The caller
        got the same answer either way."""
        detail = {"caller": caller.subject, "role": caller.role, "scope": refused.tenant_id}

        def work(conn: Connection) -> tuple[str, str]:
            foreign = run_store.exists(conn, refused.run_id, tenant_id=None)
            tag, action = (
                ("SECURITY", "RUN_NOT_VISIBLE") if foreign else ("LOOKUP", "RUN_NOT_FOUND")
            )
            audit.record(
                conn,
                tag=tag,
                action=action,
                tenant_id=refused.tenant_id,
                run_id=refused.run_id,
                actor=caller.subject,
                now=self.clock.now(conn),
                detail=detail,
            )
            return tag, action

        tag, action = self.db.run(work)
        line = {"tag": tag, "action": action, "run_id": refused.run_id, **detail}
        if tag == "SECURITY":
            audit_log.warning("run not visible to caller", extra={"audit": line})
        else:
            audit_log.info("no such run", extra={"audit": line})
        self.observer.audited(line)

    def end_run(
        self,
        conn: Connection,
        notes: Notes,
        run_id: str,
        *,
        tenant_id: str | None,
        event: Event,
        reason: StopReason | None,
        now: datetime,
        guard: run_store.Guard,
        tag: str,
        caller: Caller,
        detected_by: str,
        error: str | None = None,
        cancel_reason: str | None = None,
    ) -> Ended | None:
        """The one terminal transition of a run; None if its guard did not hold."""
        row = run_store.finalize(
            conn,
            run_id,
            tenant_id=tenant_id,
            event=event,
            reason=reason.value if reason else None,
            now=now,
            guard=guard,
            error=error,
            cancel_reason=cancel_reason,
        )
        if row is None:
            return None
        failed = job_store.fail_unfinished(
            conn,
            run_id,
            tenant_id=row.tenant_id,
            reason=(reason or StopReason.WORKER_FAILED).value,
            now=now,
        )
        ended, audit_row = self._fan_out(
            conn,
            notes,
            row,
            failed,
            reason=reason,
            now=now,
            tag=tag,
            caller=caller,
            detected_by=detected_by,
        )
        audit.record_many(conn, [audit_row], now=now)
        return ended

    def _fan_out(
        self,
        conn: Connection,
        notes: Notes,
        row: Any,
        failed: job_store.FailedJobs,
        *,
        reason: StopReason | None,
        now: datetime,
        tag: str,
        caller: Caller,
        detected_by: str,
    ) -> tuple[Ended, dict[str, Any]]:
        """What follows a run's terminal statement: its slot release, its audit row, its log line.

        Returns the ending and the audit row to write (callers write them in one statement).
        """
        release = self.release_slots(
            conn,
            notes,
            tenant_id=row.tenant_id,
            run_id=row.id,
            slots=failed.freed,
            cause=detected_by,
            now=now,
        )
        ended = Ended(
            row.id,
            row.tenant_id,
            RunState(row.state),
            reason.value if reason else None,
            failed.total,
            failed.in_progress,
            release,
        )
        detail = {
            "state": ended.state.value,
            "reason": ended.reason,
            "detected_by": detected_by,
            "failed_jobs": ended.failed_jobs,
            "released_slots": ended.released_slots,
            "caller_role": caller.role,
        }
        notes.add(message="run ended", tag=tag, run_id=row.id, tenant_id=row.tenant_id, **detail)
        event = {
            "tag": tag,
            "action": RUN_ENDED,
            "tenant_id": row.tenant_id,
            "run_id": row.id,
            "actor": caller.subject,
            "detail": detail,
        }
        return ended, event

    def end_if_silent(
        self,
        conn: Connection,
        notes: Notes,
        candidate: run_store.SilentRun,
        *,
        now: datetime,
        silent_since: datetime,
        reason: StopReason,
        detected_by: str,
        caller: Caller,
    ) -> Ended | None:
        """Finalize a run that lost its worker, if it is still silent (the guard re-checks)."""
        outcome = finalization_for_lost_run(
            cancel_requested=candidate.cancel_requested, reason=reason
        )
        return self.end_run(
            conn,
            notes,
            candidate.id,
            tenant_id=candidate.tenant_id,
            event=outcome.event,
            reason=outcome.reason,
            now=now,
            guard=run_store.Guard(
                silent_since=silent_since, cancel_requested=candidate.cancel_requested
            ),
            tag="STALE_DETECTION",
            caller=caller,
            detected_by=detected_by,
        )

    def lease_miss(
        self,
        conn: Connection,
        run_id: str,
        *,
        tenant_id: str | None,
        worker: str | None,
        lease_epoch: int,
    ) -> Exception:
        """Why a fenced write matched nothing: the run is not visible, or the lease is gone.

        A run held by another worker identity is not visible to this one (it
        gets the answer of a missing run); a run held by nobody any more (it
        ended) answers LEASE_LOST, so that its former holder stops.
        """
        run = run_store.get(conn, run_id, tenant_id=tenant_id)
        if run is None or (
            worker is not None
            and run.worker_id is not None
            and not worker_owns(worker, run.worker_id)
        ):
            return RunNotVisible(run_id=run_id, tenant_id=tenant_id)
        return LeaseLost(
            metadata={
                "run_id": run_id,
                "lease_epoch": str(lease_epoch),
                "current_epoch": str(run.lease_epoch),
                "state": run.state.value,
            }
        )

    def end_runs(
        self,
        conn: Connection,
        notes: Notes,
        run_ids: Sequence[str],
        *,
        tenant_id: str | None,
        event: Event,
        reason: StopReason | None,
        now: datetime,
        guard: run_store.Guard,
        tag: str,
        caller: Caller,
        detected_by: str,
    ) -> list[Ended]:
        """:meth:`end_run` for many runs at once, with its very semantics.

        One guarded statement ends every run whose guard still holds; only
        for the runs it returned, set-based statements in the same
        transaction fail their unfinished jobs and write one audit row each
        (the same tag, detail and log line as :meth:`end_run`).
        """
        rows = run_store.finalize_many(
            conn,
            run_ids,
            tenant_id=tenant_id,
            event=event,
            reason=reason.value if reason else None,
            now=now,
            guard=guard,
        )
        if not rows:
            return []
        failed = job_store.fail_unfinished_many(
            conn,
            [row.id for row in rows],
            tenant_id=tenant_id,
            reason=(reason or StopReason.WORKER_FAILED).value,
            now=now,
        )
        ended = []
        audit_rows: list[dict[str, Any]] = []
        for row in sorted(rows, key=lambda r: r.id):
            one, audit_row = self._fan_out(
                conn,
                notes,
                row,
                failed[row.id],
                reason=reason,
                now=now,
                tag=tag,
                caller=caller,
                detected_by=detected_by,
            )
            ended.append(one)
            audit_rows.append(audit_row)
        audit.record_many(conn, audit_rows, now=now)
        return ended

    def end_silent(
        self,
        conn: Connection,
        notes: Notes,
        candidates: Sequence[run_store.SilentRun],
        *,
        now: datetime,
        silent_since: datetime,
        reason: StopReason,
        detected_by: str,
        caller: Caller,
    ) -> list[Ended]:
        """:meth:`end_if_silent` for many runs: one :meth:`end_runs` per kind of ending."""
        ended: list[Ended] = []
        for cancel_requested in (False, True):
            run_ids = [c.id for c in candidates if c.cancel_requested is cancel_requested]
            if not run_ids:
                continue
            outcome = finalization_for_lost_run(cancel_requested=cancel_requested, reason=reason)
            ended += self.end_runs(
                conn,
                notes,
                run_ids,
                tenant_id=None,
                event=outcome.event,
                reason=outcome.reason,
                now=now,
                guard=run_store.Guard(silent_since=silent_since, cancel_requested=cancel_requested),
                tag="STALE_DETECTION",
                caller=caller,
                detected_by=detected_by,
            )
        return ended
