"""Audit rows: every terminal transition and every refused access leaves one."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, or_, select

from runsvc.domain import LARGEST_RUN_NUMBER, run_number
from runsvc.store.schema import audit_events, runs


@dataclass(frozen=True)
class AuditEvent:
    tag: str
    action: str
    tenant_id: str | None
    run_id: str | None
    actor: str | None
    detail: Mapping[str, Any]


def record(conn: Connection, events: Sequence[AuditEvent], *, now: datetime) -> None:
    """Audit rows, one statement for any number of them."""
    if not events:
        return
    conn.execute(
        audit_events.insert(),
        [
            {
                "created_at": now,
                "tag": e.tag,
                "action": e.action,
                "tenant_id": e.tenant_id,
                "run_id": e.run_id,
                "actor": e.actor,
                "detail": json.dumps(dict(e.detail), sort_keys=True, default=str),
            }
            for e in events
        ],
    )


def recent(
    conn: Connection, *, tenant_id: str | None, run_id: str | None, limit: int
) -> list[dict[str, Any]]:
    """The newest audit rows, oldest first, for a tenant, a run, or (both None) everyone."""
    query = select(audit_events)
    if tenant_id is not None:
        query = query.where(audit_events.c.tenant_id == tenant_id)
    if run_id is not None:
        query = query.where(_names_run(run_id))
    rows = conn.execute(query.order_by(audit_events.c.id.desc()).limit(limit)).all()
    return [{**row._asdict(), "detail": json.loads(row.detail)} for row in reversed(rows)]


def _names_run(ref: str) -> ColumnElement[bool]:
    """Rows of the run ``ref`` names: by its id, or by its number (and any row that named
    it by that number, such as a refusal)."""
    number = run_number(ref)
    if number is None or number > LARGEST_RUN_NUMBER:
        return audit_events.c.run_id == ref
    numbered = select(runs.c.id).where(runs.c.number == number).scalar_subquery()
    return or_(audit_events.c.run_id == ref, audit_events.c.run_id == numbered)
