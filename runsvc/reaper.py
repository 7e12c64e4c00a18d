"""The background finalizer: ends runs whose worker went silent.

Every batch is one transaction: it claims its candidates (an index scan over
the silent runs only, locking the rows it returns and skipping rows another
replica's pass holds), then ends them with one guarded statement that
re-checks silence with that transaction's clock (a heartbeat that committed
first wins), then writes the jobs and audit rows of the runs it ended, set by
set. Replicas reaping at once therefore take disjoint batches: each stale run
is read, attempted and ended by one of them. On SQLite, the single-process
embedded default, the transaction holds the database's write lock instead.

Each replica judges silence only from its own trusted horizon (see
:meth:`runsvc.domain.LivenessPolicy.trusted_stale_horizon`), and runs its own
breaker: the breaker counts the fleet's running and silent runs, so every
replica that trusts its access reaches the same verdict, and sharing the
batches does not change it (a batch ends as many silent runs as running ones,
which only lowers the share that later counts see).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Connection

from runsvc.domain import Event, StopReason
from runsvc.errors import RunsvcError
from runsvc.service.context import Caller, Context, Ended, Ending, Notes
from runsvc.store import runs as run_store

log = logging.getLogger(__name__)

REAPER = Caller(subject="runsvc-reaper", role="system")
# The reaper's name among the background jobs whose passes are counted.
PASS_JOB = "reaper"


@dataclass
class ReapReport:
    ended: dict[str, int] = field(default_factory=dict)  # reason -> runs ended
    held_back: int = 0  # stale runs the breaker kept from being stopped
    claimed: int = 0  # candidates this pass took (another replica's pass takes the rest)

    def add(self, reason: str) -> None:
        self.ended[reason] = self.ended.get(reason, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.ended.values())


class Reaper:
    def __init__(self, ctx: Context, *, batch_size: int = 500) -> None:
        self._ctx = ctx
        self._batch = batch_size

    def pass_once(self, *, detected_by: str = "reaper") -> ReapReport:
        """End stale runs and runs whose cancel request was never acknowledged."""
        started = time.monotonic()
        report = ReapReport()
        stale = self._stale_unless_breaker_trips(report)
        if stale:
            self._sweep(report, self._ctx.stale_horizon, StopReason.HEARTBEAT_TIMEOUT, detected_by)
        self._end_unacknowledged_cancels(report, detected_by)
        # Only a pass that got this far counts: operators alert on its absence.
        self._ctx.observer.reaper_passed(duration_seconds=time.monotonic() - started)
        # Stale runs were there, yet another replica's pass had claimed every one.
        skipped = bool(stale) and not report.claimed
        self._ctx.observer.background_pass(PASS_JOB, done=not skipped)
        return report

    def startup_pass(self) -> ReapReport:
        """The seed's cleanup when a server starts, then an ordinary pass.

        Runs silent for the startup horizon stop as STARTUP_CLEANUP; silent
        runs with nothing left to do stop as EMPTY_QUEUE. A run whose worker
        is still heartbeating is never stopped for an empty queue: it is about
        to finish, and stopping it would lose that it completed.
        """
        report = ReapReport()
        policy = self._ctx.policy
        self._sweep(report, policy.startup_horizon, StopReason.STARTUP_CLEANUP, "startup")
        self._sweep(
            report, self._ctx.stale_horizon, StopReason.EMPTY_QUEUE, "startup", nothing_left=True
        )
        for reason, count in self.pass_once(detected_by="startup").ended.items():
            report.ended[reason] = report.ended.get(reason, 0) + count
        return report

    def _sweep(
        self,
        report: ReapReport,
        horizon: Callable[[datetime], datetime | None],
        reason: StopReason,
        detected_by: str,
        *,
        nothing_left: bool = False,
    ) -> None:
        """End, batch by batch, the runs silent since ``horizon`` (with ``nothing_left``, only
        those with no queued or in-progress job: the seed's empty-queue rule)."""

        def work(conn: Connection, now: datetime, notes: Notes) -> tuple[int, list[Ended]]:
            since = horizon(now)
            if since is None:  # no trusted horizon now: judge nothing
                return 0, []
            guard = run_store.Guard(silent_since=since, nothing_unfinished=nothing_left)
            candidates = run_store.find_ending(conn, guard, limit=self._batch)
            ended = self._ctx.end_lost(
                conn,
                notes,
                candidates,
                now=now,
                silent_since=since,
                reason=reason,
                detected_by=detected_by,
                caller=REAPER,
            )
            return len(candidates), ended

        while True:
            claimed, ended = self._ctx.transact(work, caller=REAPER)
            report.claimed += claimed
            for one in ended:
                report.add(one.reason or one.state.value)
            # A full batch may hide more; one that ended nothing would loop forever.
            if claimed < self._batch or not ended:
                return

    def _stale_unless_breaker_trips(self, report: ReapReport) -> int:
        """How many runs look stale to this replica; 0 when the breaker holds the pass back.

        The pass is held back when it would stop more than the set share of the
        running runs: so many silent at once says more about heartbeats failing
        to arrive (a partition between the workers and the replicas, an
        overloaded database) than about that many workers dying; the next pass
        looks again.
        """

        def count(conn: Connection, now: datetime, notes: Notes) -> tuple[int, int]:
            since = self._ctx.stale_horizon(now)
            if since is None:
                return 0, 0
            return run_store.count_running_and_silent(conn, silent_since=since)

        running, stale = self._ctx.transact(count, caller=REAPER)
        if not self._ctx.policy.breaker_trips(stale=stale, running=running):
            return stale
        report.held_back = stale
        log.warning(
            "reaper breaker tripped: stopping no run this pass",
            extra={"stale": stale, "running": running, "share": self._ctx.policy.breaker_share},
        )
        self._ctx.observer.reaper_held_back(stale=stale, running=running)
        return 0

    def _end_unacknowledged_cancels(self, report: ReapReport, detected_by: str) -> None:
        policy = self._ctx.policy

        def work(conn: Connection, now: datetime, notes: Notes) -> tuple[int, list[Ended]]:
            before = policy.cancel_horizon(now)
            guard = run_store.Guard(cancel_requested=True, cancel_requested_before=before)
            candidates = run_store.find_ending(conn, guard, limit=self._batch)
            ending = Ending(
                Event.LOST_WHILE_CANCELLING,
                StopReason.CANCEL_TIMEOUT,
                guard,
                tag="STALE_DETECTION",
                detected_by=detected_by,
                caller=REAPER,
            )
            run_ids = [c.id for c in candidates]
            ended = self._ctx.end_runs(conn, notes, run_ids, ending, tenant_id=None, now=now)
            return len(candidates), ended

        claimed, ended = self._ctx.transact(work, caller=REAPER)
        report.claimed += claimed
        for _ in ended:
            report.add(StopReason.CANCEL_TIMEOUT.value)

    def run_forever(self, stop: threading.Event, *, interval: float) -> None:
        """Pass every ``interval`` seconds until ``stop`` is set; a failed pass is retried."""
        while not stop.wait(interval):
            try:
                report = self.pass_once()
            except RunsvcError as error:
                log.warning("reaper pass failed", extra={"error": str(error)})
                continue
            except Exception:
                log.exception("reaper pass failed unexpectedly")
                continue
            if report.total:
                log.info("reaper pass ended runs", extra={"ended": report.ended})
