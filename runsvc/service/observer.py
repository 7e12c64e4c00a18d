"""The one seam through which the service reports what happened, for metrics.

The service calls an :class:`Observer` after a transaction has committed (so
a rolled-back attempt is never counted) and knows nothing of Prometheus; the
composition root plugs in :class:`runsvc.metrics.counters.MetricsObserver`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol


class Observer(Protocol):
    def audited(self, line: Mapping[str, Any]) -> None:
        """An audit event was committed (the same fields as its JSON log line)."""

    def heartbeat(self) -> None:
        """A lease holder's heartbeat was recorded."""

    def lease_lost(self) -> None:
        """A worker write was refused (or recorded late) because its lease was not current."""

    def reaper_passed(self, *, duration_seconds: float) -> None:
        """A reaper pass finished without error."""

    def reaper_held_back(self, *, stale: int, running: int) -> None:
        """The breaker kept a reaper pass from stopping ``stale`` of ``running`` runs at once."""

    def background_pass(self, job: str, *, done: bool) -> None:
        """A pass of a background ``job`` was done, or skipped: another replica held its work."""


class NullObserver:
    """Observes nothing: the default, and what tests of the use cases get."""

    def audited(self, line: Mapping[str, Any]) -> None:
        pass

    def heartbeat(self) -> None:
        pass

    def lease_lost(self) -> None:
        pass

    def reaper_passed(self, *, duration_seconds: float) -> None:
        pass

    def reaper_held_back(self, *, stale: int, running: int) -> None:
        pass

    def background_pass(self, job: str, *, done: bool) -> None:
        pass
