"""Turns at once-per-interval jobs, shared by every replica through a database lease.

A replica runs a pass only after taking the job's lease for one interval
(database time); every replica, the holder too, skips its passes until it
expires, so passes stay about one interval apart fleet-wide however many
replicas tick. A pass that fails gives the lease up,
so any replica may retry at once. A holder that dies mid-pass gives nothing
up: its lease simply expires, and the first replica to tick after that takes
the next turn, at most one interval late. A pass that outlives the interval
may overlap the next one, so a job guarded this way must stay safe when two
passes meet (the reconciler is); the lease removes the waste, not a race.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Protocol, TypeVar

from sqlalchemy import Connection

from runsvc.clock import Clock
from runsvc.errors import RunsvcError
from runsvc.store import leases
from runsvc.store.engine import Database

log = logging.getLogger(__name__)

T = TypeVar("T")


class PassObserver(Protocol):
    def background_pass(self, job: str, *, done: bool) -> None:
        """A pass of ``job`` was done, or skipped because another replica held the work."""


class NoPassObserver:
    def background_pass(self, job: str, *, done: bool) -> None:
        pass


def replica_name() -> str:
    """A name for this process that no other replica has: host, pid and a random part."""
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


class IntervalLease:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        *,
        job: str,
        interval: float,
        holder: str | None = None,
        observer: PassObserver | None = None,
    ) -> None:
        self._db = db
        self._clock = clock
        self.job = job
        self._interval = timedelta(seconds=interval)
        self.holder = holder or replica_name()
        self.observer: PassObserver = observer or NoPassObserver()

    def take(self) -> bool:
        """Take this interval's turn; False when another replica holds it."""

        def work(conn: Connection) -> bool:
            now = self._clock.now(conn)
            return leases.take(
                conn, self.job, holder=self.holder, now=now, until=now + self._interval
            )

        return self._db.run(work)

    def give_up(self) -> None:
        """Let any replica take the next turn at once; never raises (the lease expires anyway)."""
        try:
            self._db.run(
                lambda conn: leases.give_up(
                    conn, self.job, holder=self.holder, now=self._clock.now(conn)
                )
            )
        except RunsvcError as error:
            log.info("lease not given up; it expires", extra={"job": self.job, "error": str(error)})

    def run(self, work: Callable[[], T], *, urgent: bool = False) -> T | None:
        """``work()`` if this replica takes the turn, else None (counted as skipped).

        ``urgent`` work runs whoever's turn it is, and takes the turn if it is free.
        """
        took = self.take()
        if not (took or urgent):
            self.observer.background_pass(self.job, done=False)
            return None
        try:
            result = work()
        except BaseException:
            if took:
                self.give_up()
            raise
        self.observer.background_pass(self.job, done=True)
        return result
