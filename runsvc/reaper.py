"""The background finalizer: ends runs whose worker went silent.

Every pass finds a batch of candidates in one short read (an index scan
over the silent runs only), then ends the whole batch in one transaction:
one guarded statement that re-checks silence with that transaction's clock
(a heartbeat that lands in between wins, and replicas reaping at once cannot
end a run twice), then the jobs and audit rows of the runs it ended, set by
set.
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
from runsvc.service.context import Caller, Context, Ended, Notes
from runsvc.store import runs as run_store

log = logging.getLogger(__name__)

REAPER = Caller(subject="runsvc-reaper", role="system")

# (connection, horizon) -> candidates silent since before the horizon
Finder = Callable[[Connection, datetime], list[run_store.SilentRun]]


@dataclass
class ReapReport:
    ended: dict[str, int] = field(default_factory=dict)  # reason -> runs ended
    held_back: int = 0  # stale runs the breaker kept from being stopped

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
        if not self._breaker_tripped(report):
            self._sweep(
                report,
                lambda conn, horizon: run_store.find_silent(
                    conn, silent_since=horizon, limit=self._batch
                ),
                self._ctx.stale_horizon,
                StopReason.HEARTBEAT_TIMEOUT,
                detected_by,
            )
        self._end_unacknowledged_cancels(report, detected_by)
        # Only a pass that got this far counts: operators alert on its absence.
        self._ctx.observer.reaper_passed(duration_seconds=time.monotonic() - started)
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
        self._sweep(
            report,
            lambda conn, horizon: run_store.find_silent(
                conn, silent_since=horizon, limit=self._batch
            ),
            policy.startup_horizon,
            StopReason.STARTUP_CLEANUP,
            "startup",
        )
        self._sweep(
            report,
            lambda conn, horizon: run_store.find_silent_with_nothing_left(
                conn, silent_since=horizon, limit=self._batch
            ),
            self._ctx.stale_horizon,
            StopReason.EMPTY_QUEUE,
            "startup",
        )
        for reason, count in self.pass_once(detected_by="startup").ended.items():
            report.ended[reason] = report.ended.get(reason, 0) + count
        return report

    def _sweep(
        self,
        report: ReapReport,
        find: Finder,
        horizon: Callable[[datetime], datetime | None],
        reason: StopReason,
        detected_by: str,
    ) -> None:
        def look(conn: Connection, now: datetime, notes: Notes) -> list[run_store.SilentRun]:
            since = horizon(now)
            return [] if since is None else find(conn, since)

        while True:
            candidates = self._ctx.transact(look, caller=REAPER)
            if not candidates:
                return

            def work(
                conn: Connection,
                now: datetime,
                notes: Notes,
                batch: list[run_store.SilentRun] = candidates,
            ) -> list[Ended]:
                since = horizon(now)
                if since is None:  # trust was lost since the look: judge nothing
                    return []
                return self._ctx.end_silent(
                    conn,
                    notes,
                    batch,
                    now=now,
                    silent_since=since,
                    reason=reason,
                    detected_by=detected_by,
                    caller=REAPER,
                )

            ended = self._ctx.transact(work, caller=REAPER)
            for one in ended:
                report.add(one.reason or one.state.value)
            # A full batch may hide more; one that ended nothing would loop forever.
            if len(candidates) < self._batch or not ended:
                return

    def _breaker_tripped(self, report: ReapReport) -> bool:
        """Hold the whole pass back when it would stop more than the set share of running runs.

        So many silent at once says more about heartbeats failing to arrive
        (a partition between the workers and the replicas, an overloaded
        database) than about that many workers dying; the next pass looks again.
        """

        def count(conn: Connection, now: datetime, notes: Notes) -> tuple[int, int]:
            since = self._ctx.stale_horizon(now)
            if since is None:
                return 0, 0
            return run_store.count_running_and_silent(conn, silent_since=since)

        running, stale = self._ctx.transact(count, caller=REAPER)
        if not self._ctx.policy.breaker_trips(stale=stale, running=running):
            return False
        report.held_back = stale
        log.warning(
            "reaper breaker tripped: stopping no run this pass",
            extra={"stale": stale, "running": running, "share": self._ctx.policy.breaker_share},
        )
        self._ctx.observer.reaper_held_back(stale=stale, running=running)
        return True

    def _end_unacknowledged_cancels(self, report: ReapReport, detected_by: str) -> None:
        policy = self._ctx.policy
        candidates = self._ctx.transact(
            lambda conn, now, notes: run_store.find_unacknowledged_cancels(
                conn, requested_before=policy.cancel_horizon(now), limit=self._batch
            ),
            caller=REAPER,
        )
        if not candidates:
            return

        def work(conn: Connection, now: datetime, notes: Notes) -> list[Ended]:
            return self._ctx.end_runs(
                conn,
                notes,
                [c.id for c in candidates],
                tenant_id=None,
                event=Event.LOST_WHILE_CANCELLING,
                reason=StopReason.CANCEL_TIMEOUT,
                now=now,
                guard=run_store.Guard(cancel_requested_before=policy.cancel_horizon(now)),
                tag="STALE_DETECTION",
                caller=REAPER,
                detected_by=detected_by,
            )

        for _ in self._ctx.transact(work, caller=REAPER):
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
