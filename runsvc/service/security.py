"""Security decisions for the audit trail: every refusal, counted by window.

Refusals can come by the thousand from one caller (a bad token, a role that
may not call a method, a spent rate limit), so they are never written one
row per call. The first refusal of a kind and tenant is written at once (an
operator sees it without waiting), the ones after it within the window are
counted in memory and written as one row with the count when the window is
over, or at stop: two rows per kind and tenant per window at most, whatever
the flood. Each row keeps a few samples of who was refused and for what.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Connection

from runsvc.service.context import Caller, Context
from runsvc.store import audit

audit_log = logging.getLogger("runsvc.audit")
log = logging.getLogger(__name__)

SECURITY = "SECURITY"
MAX_SAMPLES = 5


@dataclass
class _Tally:
    """The refusals of one kind and tenant since the window's first, which is written."""

    started: float
    count: int = 0
    samples: list[str] = field(default_factory=list)


class SecurityAudit:
    def __init__(
        self,
        ctx: Context,
        *,
        window_seconds: float = 60.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ctx = ctx
        self._window = window_seconds
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._tallies: dict[tuple[str, str | None], _Tally] = {}

    def denied(
        self,
        *,
        action: str,
        caller: Caller,
        tenant_id: str | None,
        method: str,
    ) -> None:
        """An authenticated caller was refused (a role, a permission)."""
        self.count(action, tenant_id=tenant_id, sample=f"{caller.subject} ({caller.role}) {method}")

    def count(self, action: str, *, tenant_id: str | None, sample: str) -> None:
        """One refusal: the window's first is written now, the rest counted."""
        now = self._monotonic()
        key = (action, tenant_id)
        with self._lock:
            tally = self._tallies.get(key)
            first = tally is None
            if tally is None:
                self._tallies[key] = _Tally(started=now)
            else:
                tally.count += 1
                if len(tally.samples) < MAX_SAMPLES and sample not in tally.samples:
                    tally.samples.append(sample)
            over = [k for k, t in self._tallies.items() if now - t.started >= self._window]
            ended = [(k, self._tallies.pop(k)) for k in over]
        if first:
            self._report(action, tenant_id, count=1, samples=[sample])
        self._report_counts(ended)

    def flush(self) -> None:
        """Write the counts gathered since each window's first refusal (also called at stop)."""
        with self._lock:
            ended, self._tallies = list(self._tallies.items()), {}
        self._report_counts(ended)

    def _report_counts(self, ended: list[tuple[tuple[str, str | None], _Tally]]) -> None:
        for (action, tenant_id), tally in sorted(ended, key=lambda kv: str(kv[0])):
            if tally.count:
                self._report(action, tenant_id, count=tally.count, samples=tally.samples)

    def _report(
        self, action: str, tenant_id: str | None, *, count: int, samples: list[str]
    ) -> None:
        detail = {"count": count, "samples": samples}

        def work(conn: Connection) -> None:
            event = audit.AuditEvent(SECURITY, action, tenant_id, None, None, detail)
            audit.record(conn, [event], now=self._ctx.clock.now(conn))

        try:
            self._ctx.db.run(work)
        except Exception:
            # The refusal stands either way; the log line below still records it.
            log.exception("could not write a security audit row", extra={"action": action})
        audit_log.warning(
            "refusals",
            extra={"audit": {"tag": SECURITY, "action": action, "tenant_id": tenant_id, **detail}},
        )
