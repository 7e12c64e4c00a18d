"""The clock seam: every use case asks a clock for "now" inside its transaction.

Production uses the database's clock (``runsvc.store.clock.DatabaseClock``) so
that replicas whose wall clocks disagree still agree on which runs are stale;
tests use :class:`FakeClock` and move time instead of sleeping.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol


class Clock(Protocol):
    def now(self, session: Any) -> datetime:
        """The current time, timezone-aware UTC; ``session`` is the open transaction."""
        ...


class SystemClock:
    def now(self, session: Any) -> datetime:
        return datetime.now(UTC)


class FakeClock:
    """A clock that only moves when told to; safe to share between threads."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._lock = threading.Lock()

    def now(self, session: Any = None) -> datetime:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> datetime:
        with self._lock:
            self._now += timedelta(seconds=seconds)
            return self._now
