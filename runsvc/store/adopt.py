"""Adopt the monolith's outbound-call tables into runsvc's ``runs`` and ``jobs``.

The monolith kept runs in ``outbound_call_runs`` and their calls in
``outbound_call_jobs``; before its migration 114 a run had no
``last_heartbeat_at``. Adoption copies every row into runsvc's tables (the
monolith's tables are read, never changed, so the old code can still be
rolled back to) and is idempotent: ids are derived from the monolith's ids,
and a row whose id is already present is left alone, so a second run copies
nothing and changes nothing.

The mapping of each field and status is the run book's table ("Adopting the
monolith's database", docs/runbook.md); :data:`RUN_STATUSES`, :data:`JOB_STATUSES`,
:func:`_run_values` and :func:`_job_values` are its code.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, MetaData, Table, inspect, select

from runsvc.domain import ACTIVE_STATES, JobState, RunState, StopReason
from runsvc.store.dialects import dialect
from runsvc.store.schema import RUN_NUMBER_SEQUENCE, jobs, runs

SEED_RUNS = "outbound_call_runs"
SEED_JOBS = "outbound_call_jobs"
NAMESPACE = uuid.UUID("0b6f4a52-6d2b-4f0e-9a51-6a3b0b6a7f14")
SUPERSEDED = "SEED_SUPERSEDED"
UNKNOWN_STATUS = "SEED_UNKNOWN_STATUS"
SEED_STOPPED = "SEED_STOPPED"
BATCH = 500

RUN_STATUSES: Mapping[str, tuple[RunState, str | None]] = {
    "pending": (RunState.PENDING, None),
    "running": (RunState.RUNNING, None),
    "completed": (RunState.COMPLETED, None),
    "failed": (RunState.FAILED, StopReason.WORKER_FAILED.value),
    "cancelled": (RunState.CANCELLED, StopReason.CANCELLED_BY_USER.value),
    "canceled": (RunState.CANCELLED, StopReason.CANCELLED_BY_USER.value),
    "stopped": (RunState.STOPPED, SEED_STOPPED),
}

JOB_STATUSES: Mapping[str, tuple[JobState, str | None]] = {
    "queued": (JobState.QUEUED, None),
    "in_progress": (JobState.IN_PROGRESS, None),
    "dialing": (JobState.IN_PROGRESS, None),
    "calling": (JobState.IN_PROGRESS, None),
    "ringing": (JobState.IN_PROGRESS, None),
    "completed": (JobState.COMPLETED, None),
    "failed": (JobState.FAILED, None),
    "cancelled": (JobState.FAILED, StopReason.CANCELLED_BY_USER.value),
    "canceled": (JobState.FAILED, StopReason.CANCELLED_BY_USER.value),
    "skipped": (JobState.FAILED, StopReason.CANCELLED_BY_USER.value),
}


def run_uuid(seed_id: object) -> str:
    return str(uuid.uuid5(NAMESPACE, f"{SEED_RUNS}/{seed_id}"))


def job_uuid(seed_id: object) -> str:
    return str(uuid.uuid5(NAMESPACE, f"{SEED_JOBS}/{seed_id}"))


@dataclass
class Plan:
    """What adoption finds, and what it copies (or would copy, for ``--check``)."""

    found: bool = False
    runs_seen: int = 0
    runs_present: int = 0
    runs_copied: int = 0
    jobs_seen: int = 0
    jobs_present: int = 0
    jobs_copied: int = 0
    heartbeats_backfilled: int = 0
    superseded: int = 0
    unfinished_jobs_failed: int = 0
    run_states: Counter[str] = field(default_factory=Counter)
    unknown_statuses: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "seed_tables_found": self.found,
            "runs": {
                "seen": self.runs_seen,
                "already_adopted": self.runs_present,
                "to_copy": self.runs_copied,
                "by_state": dict(sorted(self.run_states.items())),
                "heartbeats_backfilled": self.heartbeats_backfilled,
                "superseded": self.superseded,
            },
            "jobs": {
                "seen": self.jobs_seen,
                "already_adopted": self.jobs_present,
                "to_copy": self.jobs_copied,
                "unfinished_on_ended_runs_failed": self.unfinished_jobs_failed,
            },
            "unknown_statuses": dict(sorted(self.unknown_statuses.items())),
        }


def seed_tables_present(conn: Connection) -> bool:
    names = set(inspect(conn).get_table_names())
    return {SEED_RUNS, SEED_JOBS} <= names


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _first(*values: datetime | None) -> datetime | None:
    return next((v for v in values if v is not None), None)


def _order_key(row: Mapping[str, Any]) -> tuple[datetime, str]:
    created = _utc(row.get("created_at")) or datetime.min.replace(tzinfo=UTC)
    return created, str(row["id"]).zfill(20)


def _run_values(row: Mapping[str, Any], plan: Plan, *, live_kept: bool) -> dict[str, Any]:
    status = str(row["status"] or "").strip().lower()
    state, reason = RUN_STATUSES.get(status, (RunState.STOPPED, UNKNOWN_STATUS))
    error = row.get("last_error")
    if status not in RUN_STATUSES:
        plan.unknown_statuses[f"run:{status}"] += 1
        error = f"seed status {row['status']!r}" + (f": {error}" if error else "")
    created = _utc(row["created_at"])
    updated = _utc(row.get("updated_at"))
    lock_ts = _utc(row.get("lock_ts"))
    heartbeat = _utc(row.get("last_heartbeat_at"))
    if state in ACTIVE_STATES and not live_kept:
        state, reason = RunState.STOPPED, SUPERSEDED
        plan.superseded += 1
    live = state in ACTIVE_STATES
    if live and heartbeat is None:
        heartbeat = _first(lock_ts, updated, created)
        plan.heartbeats_backfilled += 1
    running = state is RunState.RUNNING
    plan.run_states[state.value] += 1
    return {
        "id": run_uuid(row["id"]),
        "number": int(row["id"]),
        "tenant_id": str(row["business_id"]),
        "request_id": f"seed-run-{row['id']}",
        "state": state.value,
        "stop_reason": reason,
        "error": error,
        "cancel_requested": False,
        "worker_id": row.get("locked_by_worker") if running else None,
        "lease_epoch": 1 if running else 0,
        "lock_ts": lock_ts if running else None,
        "last_heartbeat_at": heartbeat,
        "created_at": created,
        "started_at": _utc(row.get("started_at")) or (lock_ts if running else None),
        "ended_at": None if live else _first(_utc(row.get("ended_at")), updated, created),
        "updated_at": updated or created,
    }


def _job_values(
    row: Mapping[str, Any], seq: int, run: Mapping[str, Any], plan: Plan
) -> dict[str, Any]:
    status = str(row["status"] or "").strip().lower()
    state, reason = JOB_STATUSES.get(status, (JobState.FAILED, UNKNOWN_STATUS))
    error = row.get("error_message")
    if status not in JOB_STATUSES:
        plan.unknown_statuses[f"job:{status}"] += 1
        error = f"seed status {row['status']!r}" + (f": {error}" if error else "")
    run_live = run["state"] in {s.value for s in ACTIVE_STATES}
    if not run_live and state in {JobState.QUEUED, JobState.IN_PROGRESS}:
        # runsvc's rule for a run that ended: nothing of it stays unfinished.
        reason = (
            StopReason.WORKER_LOST.value
            if state is JobState.IN_PROGRESS
            else run["stop_reason"] or StopReason.WORKER_FAILED.value
        )
        state = JobState.FAILED
        plan.unfinished_jobs_failed += 1
    payload = {
        key: row.get(key)
        for key in ("phone_number", "lead_id", "call_sid")
        if row.get(key) is not None
    }
    created = _utc(row["created_at"])
    finished = state in {JobState.COMPLETED, JobState.FAILED}
    return {
        "id": job_uuid(row["id"]),
        "run_id": run["id"],
        "tenant_id": run["tenant_id"],
        "seq": seq,
        "external_id": f"seed-job-{row['id']}",
        "payload": json.dumps({"seed_job_id": row["id"], **payload}, default=str).encode(),
        "state": state.value,
        "stop_reason": reason,
        "error": error,
        "lease_epoch": run["lease_epoch"] if state is not JobState.QUEUED else None,
        "late": False,
        "created_at": created,
        "started_at": _utc(row.get("started_at")),
        "ended_at": (
            _first(_utc(row.get("completed_at")), _utc(row.get("updated_at")), created)
            if finished
            else None
        ),
    }


def _present(conn: Connection, column: Any, ids: Sequence[Any]) -> set[Any]:
    found: set[Any] = set()
    for start in range(0, len(ids), BATCH):
        chunk = ids[start : start + BATCH]
        found |= set(conn.execute(select(column).where(column.in_(chunk))).scalars())
    return found


def _tenants_with_live_runs(conn: Connection) -> set[str]:
    active = sorted(s.value for s in ACTIVE_STATES)
    return set(conn.execute(select(runs.c.tenant_id).where(runs.c.state.in_(active))).scalars())


def _rows(conn: Connection, query: Any) -> Iterable[Mapping[str, Any]]:
    return (dict(row._mapping) for row in conn.execute(query))


def adopt(conn: Connection, *, apply: bool) -> Plan:
    """Copy the monolith's rows that are not adopted yet; with ``apply=False``, only count."""
    plan = Plan()
    if not seed_tables_present(conn):
        return plan
    plan.found = True
    seed = MetaData()
    seed_runs = Table(SEED_RUNS, seed, autoload_with=conn)
    seed_jobs = Table(SEED_JOBS, seed, autoload_with=conn)
    all_runs = sorted(_rows(conn, select(seed_runs)), key=_order_key)
    plan.runs_seen = len(all_runs)
    # Before the first migration (``--check`` on the monolith's database) nothing is adopted.
    migrated = runs.name in inspect(conn).get_table_names()
    if apply and not migrated:
        raise RuntimeError("migrate the database before adopting the seed's tables")
    present = (
        _present(conn, runs.c.id, [run_uuid(r["id"]) for r in all_runs]) if migrated else set()
    )
    plan.runs_present = len(present)
    # Newest live run first per tenant: it stays live, unless runsvc already has one.
    live_tenants = _tenants_with_live_runs(conn) if migrated else set()
    new_runs: dict[object, dict[str, Any]] = {}
    for row in reversed(all_runs):
        if run_uuid(row["id"]) in present:
            continue
        tenant = str(row["business_id"])
        values = _run_values(row, plan, live_kept=tenant not in live_tenants)
        if values["state"] in {s.value for s in ACTIVE_STATES}:
            live_tenants.add(tenant)
        new_runs[row["id"]] = values
    plan.runs_copied = len(new_runs)
    ordered = [new_runs[r["id"]] for r in all_runs if r["id"] in new_runs]
    if apply:
        _refuse_taken_numbers(conn, [v["number"] for v in ordered])
        for start in range(0, len(ordered), BATCH):
            conn.execute(runs.insert(), ordered[start : start + BATCH])
        _number_new_runs_above(conn, [v["number"] for v in ordered])
    _adopt_jobs(conn, seed_jobs, all_runs, new_runs, plan, apply=apply, migrated=migrated)
    return plan


def _refuse_taken_numbers(conn: Connection, numbers: Sequence[int]) -> None:
    """A run runsvc created before adoption may hold a monolith id as its number."""
    taken = sorted(_present(conn, runs.c.number, list(numbers)))
    if taken:
        shown = ", ".join(map(str, taken[:10]))
        raise RuntimeError(
            f"runs numbered {shown} already exist in runsvc: adopt the monolith's runs"
            " before runsvc creates runs of its own (nothing was copied)"
        )


def _number_new_runs_above(conn: Connection, numbers: Sequence[int]) -> None:
    """Move the run numbers' sequence past the adopted numbers (never back)."""
    if numbers:
        dialect(conn).move_sequence_past(conn, RUN_NUMBER_SEQUENCE, max(numbers))


def _adopt_jobs(
    conn: Connection,
    seed_jobs: Table,
    all_runs: Sequence[Mapping[str, Any]],
    new_runs: Mapping[object, Mapping[str, Any]],
    plan: Plan,
    *,
    apply: bool,
    migrated: bool,
) -> None:
    by_id = {r["id"]: r for r in all_runs}
    seed_ids = [r["id"] for r in all_runs]
    for start in range(0, len(seed_ids), BATCH):
        chunk = seed_ids[start : start + BATCH]
        rows = list(
            _rows(
                conn,
                select(seed_jobs)
                .where(seed_jobs.c.run_id.in_(chunk))
                .order_by(seed_jobs.c.run_id, seed_jobs.c.id),
            )
        )
        plan.jobs_seen += len(rows)
        ids = [job_uuid(r["id"]) for r in rows]
        present = _present(conn, jobs.c.id, ids) if migrated else set()
        plan.jobs_present += len(present)
        seq: Counter[object] = Counter()
        batch: list[dict[str, Any]] = []
        for row in rows:
            seq[row["run_id"]] += 1
            if job_uuid(row["id"]) in present:
                continue
            run = new_runs.get(row["run_id"])
            if run is None:
                # The run was adopted earlier and may have moved on since: its
                # new jobs are recorded as they are, under the adopted run.
                run = _adopted_run(conn, by_id[row["run_id"]])
            batch.append(_job_values(row, seq[row["run_id"]], run, plan))
        plan.jobs_copied += len(batch)
        if apply and batch:
            conn.execute(jobs.insert(), batch)


def _adopted_run(conn: Connection, seed_row: Mapping[str, Any]) -> Mapping[str, Any]:
    row = conn.execute(
        select(
            runs.c.id, runs.c.tenant_id, runs.c.state, runs.c.stop_reason, runs.c.lease_epoch
        ).where(runs.c.id == run_uuid(seed_row["id"]))
    ).one()
    return dict(row._mapping)
