"""Security decisions for the audit trail: denials, and refusals aggregated by window.

A denial of an authenticated caller is one ``SECURITY`` row and one JSON log
line, at once. Refused tokens and rate-limited calls can come by the
thousand from one attacker, so they are counted in memory and written as one
row (and one log line) per kind and tenant per window, with the count: a
flood cannot flood the audit table or the log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection

from runsvc.service.context import Caller, Context
from runsvc.store import audit

audit_log = logging.getLogger("runsvc.audit")
log = logging.getLogger(__name__)

SECURITY = "SECURITY"
MAX_SAMPLES = 5


@dataclass
class _Tally:
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
        self._window_start: float | None = None

    def denied(
        self,
        *,
        action: str,
        caller: Caller,
        tenant_id: str | None,
        method: str,
        run_id: str | None = None,
    ) -> None:
        """An authenticated caller was refused: one row now, in its own transaction."""
        detail = {"caller": caller.subject, "role": caller.role, "method": method}
        self._write(action, tenant_id=tenant_id, run_id=run_id, actor=caller.subject, detail=detail)
        audit_log.warning(
            "access denied",
            extra={
                "audit": {
                    "tag": SECURITY,
                    "action": action,
                    "tenant_id": tenant_id,
                    "run_id": run_id,
                    **detail,
                }
            },
        )

    def count(self, action: str, *, tenant_id: str | None, sample: str) -> None:
        """A refusal that may come in floods: counted, written once per window."""
        now = self._monotonic()
        with self._lock:
            tally = self._tallies.setdefault((action, tenant_id), _Tally())
            tally.count += 1
            if len(tally.samples) < MAX_SAMPLES and sample not in tally.samples:
                tally.samples.append(sample)
            due = self._window_start is None or now - self._window_start >= self._window
        if due:
            self.flush()

    def flush(self) -> None:
        """Write the counts gathered since the last flush (also called at stop)."""
        with self._lock:
            tallies, self._tallies = self._tallies, {}
            self._window_start = self._monotonic()
        for (action, tenant_id), tally in sorted(tallies.items(), key=lambda kv: str(kv[0])):
            detail = {"count": tally.count, "samples": tally.samples}
            self._write(action, tenant_id=tenant_id, run_id=None, actor=None, detail=detail)
            audit_log.warning(
                "refusals",
                extra={
                    "audit": {"tag": SECURITY, "action": action, "tenant_id": tenant_id, **detail}
                },
            )

    def _write(
        self,
        action: str,
        *,
        tenant_id: str | None,
        run_id: str | None,
        actor: str | None,
        detail: dict[str, Any],
    ) -> None:
        def work(conn: Connection) -> None:
            audit.record(
                conn,
                tag=SECURITY,
                action=action,
                tenant_id=tenant_id,
                run_id=run_id,
                actor=actor,
                now=self._ctx.clock.now(conn),
                detail=detail,
            )

        try:
            self._ctx.db.run(work)
        except Exception:
            # The refusal stands either way; the log line above or below still records it.
            log.exception("could not write a security audit row", extra={"action": action})
