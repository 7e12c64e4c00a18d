"""Since when this replica has had uninterrupted database access.

Silence is only evidence of a dead worker if this replica could have
received the heartbeats it is missing. The tracker starts untrusted (a
replica that just started has seen nothing), loses trust on any failure to
reach the database, and regains it at the database time of the first
transaction that starts and commits with no failure in between.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime


@dataclass(frozen=True)
class Attempt:
    """A transaction under way: the failure count when it began, and its database time."""

    generation: int
    now: datetime


class TrustTracker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since: datetime | None = None
        self._generation = 0

    @property
    def since(self) -> datetime | None:
        """When uninterrupted access began (database time); None: not yet, or lost."""
        return self._since

    def begin(self, now: datetime) -> Attempt:
        return Attempt(self._generation, now)

    def committed(self, attempt: Attempt) -> None:
        """``attempt`` committed: trusted from its time, unless a failure came meanwhile."""
        with self._lock:
            if self._since is None and attempt.generation == self._generation:
                self._since = attempt.now

    def failed(self) -> None:
        """The database could not be reached: nothing seen before counts as uninterrupted."""
        with self._lock:
            self._generation += 1
            self._since = None

    def vouch(self) -> None:
        """Trust access as uninterrupted since ever, on an operator's word (``runsvc reap``)."""
        with self._lock:
            self._since = datetime.min.replace(tzinfo=UTC)
