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
    Run,
    RunState,
    StopReason,
    finalization_for_lost_run,
    holds_lease,
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


audit_log = logging.getLogger("runsvc.audit")

RUN_ENDED = "RUN_ENDED"


@dataclass
class Notes:
    """What one transaction leaves for after its commit: audit log lines, slot releases."""

    lines: list[dict[str, Any]] = field(default_factory=list)
    releases: list[SlotRelease] = field(default_factory=list)

    def add(self, **fields: Any) -> None:
        self.lines.append(fields)

    def clear(self) -> None:
        self.lines.clear()
        self.releases.clear()


def lease_lost(run: Run, lease_epoch: int) -> LeaseLost:
    """Why a fenced write on a visible run matched nothing: the lease is not current (the
    run ended, or was claimed again), so its former holder must stop."""
    return LeaseLost(
        metadata={
            "run_id": run.id,
            "lease_epoch": str(lease_epoch),
            "current_epoch": str(run.lease_epoch),
            "state": run.state.value,
        }
    )


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


@dataclass(frozen=True)
class Ending:
    """How runs end: the transition and its reason, the guard the statement re-checks, and
    for the audit trail its tag, what detected it and who asked. ``error`` (a failed run's)
    and ``cancel_reason`` (kept if the run had none) are written with it."""

    event: Event
    reason: StopReason | None
    guard: run_store.Guard
    tag: str
    detected_by: str
    caller: Caller
    error: str | None = None
    cancel_reason: str | None = None


def _ended_detail(ended: Ended, ending: Ending) -> dict[str, Any]:
    return {
        "state": ended.state.value,
        "reason": ended.reason,
        "detected_by": ending.detected_by,
        "failed_jobs": ended.failed_jobs,
        "released_slots": ended.released_slots,
        "caller_role": ending.caller.role,
    }


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
        return result

    def read_settled(self, find: Callable[[Connection], Run | None]) -> Run | None:
        """The run ``find`` reads, in one statement and no transaction, when that is the whole
        answer: found, and not a run this replica may judge stale now. None otherwise, and
        the caller takes its transactional path (which finalizes a stale run, or audits a
        refused look-up)."""

        def read(conn: Connection) -> Run | None:
            run = find(conn)
            if run is None or self.silent_since(run, self.clock.now(conn)) is None:
                return run
            return None

        return self.db.read(read)

    def silent_since(self, run: Run, now: datetime) -> datetime | None:
        """The stale horizon if ``run`` may be stale at ``now`` (running, and no heartbeat
        since the horizon), else None. The guarded statement that would end it re-checks."""
        if run.state is not RunState.RUNNING:
            return None
        horizon = self.stale_horizon(now)
        heard = run.last_heartbeat_time
        if horizon is None or (heard is not None and heard >= horizon):
            return None
        return horizon

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
            event = audit.AuditEvent(
                tag, action, refused.tenant_id, refused.run_id, caller.subject, detail
            )
            audit.record(conn, [event], now=self.clock.now(conn))
            return tag, action

        tag, action = self.db.run(work)
        line = {"tag": tag, "action": action, "run_id": refused.run_id, **detail}
        if tag == "SECURITY":
            audit_log.warning("run not visible to caller", extra={"audit": line})
        else:
            audit_log.info("no such run", extra={"audit": line})
        self.observer.audited(line)

    def leased_run(
        self, conn: Connection, run_id: str, *, tenant_id: str | None, worker: str | None
    ) -> Run:
        """The run a lease call names, as its caller may see it. A run held by another worker
        identity is not visible to this one: it gets the answer of a missing run."""
        run = run_store.get(conn, run_id, tenant_id=tenant_id)
        if run is None or (run.worker_id is not None and not holds_lease(worker, run.worker_id)):
            raise RunNotVisible(run_id=run_id, tenant_id=tenant_id)
        return run

    def end_runs(
        self,
        conn: Connection,
        notes: Notes,
        run_ids: Sequence[str],
        ending: Ending,
        *,
        tenant_id: str | None,
        now: datetime,
    ) -> list[Ended]:
        """The one way runs end, one run or many: see the module docstring.

        One guarded statement ends every run whose guard still holds; only for
        the runs it returned, set-based statements in the same transaction fail
        their unfinished jobs, record their slots' release and write one audit
        row each. The ended runs, by id.
        """
        reason = ending.reason.value if ending.reason else None
        rows = run_store.end(
            conn,
            run_ids,
            tenant_id=tenant_id,
            event=ending.event,
            reason=reason,
            now=now,
            guard=ending.guard,
            error=ending.error,
            cancel_reason=ending.cancel_reason,
        )
        if not rows:
            return []
        failed = job_store.fail_unfinished(
            conn,
            [row.id for row in rows],
            tenant_id=tenant_id,
            reason=reason or StopReason.WORKER_FAILED.value,
            now=now,
        )
        ended = []
        events: list[audit.AuditEvent] = []
        for row in rows:
            # What follows a run's terminal statement: its slots' release, its log line
            # (after commit) and its audit row (all rows in one statement below).
            jobs = failed[row.id]
            release = self.release_slots(
                conn,
                notes,
                tenant_id=row.tenant_id,
                run_id=row.id,
                slots=jobs.freed,
                cause=ending.detected_by,
                now=now,
            )
            one = Ended(
                row.id, row.tenant_id, row.state, reason, jobs.total, jobs.in_progress, release
            )
            ended.append(one)
            detail = _ended_detail(one, ending)
            notes.add(
                message="run ended",
                tag=ending.tag,
                run_id=row.id,
                tenant_id=row.tenant_id,
                **detail,
            )
            events.append(
                audit.AuditEvent(
                    ending.tag, RUN_ENDED, row.tenant_id, row.id, ending.caller.subject, detail
                )
            )
        audit.record(conn, events, now=now)
        return ended

    def end_lost(
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
        """End runs that lost their worker, those still silent (the guard re-checks): one
        :meth:`end_runs` per kind of ending (a pending cancel request ends CANCELLED)."""
        ended: list[Ended] = []
        for cancel_requested in (False, True):
            run_ids = [c.id for c in candidates if c.cancel_requested is cancel_requested]
            if not run_ids:
                continue
            outcome = finalization_for_lost_run(cancel_requested=cancel_requested, reason=reason)
            guard = run_store.Guard(silent_since=silent_since, cancel_requested=cancel_requested)
            ending = Ending(
                outcome.event, outcome.reason, guard, "STALE_DETECTION", detected_by, caller
            )
            ended += self.end_runs(conn, notes, run_ids, ending, tenant_id=None, now=now)
        return ended
