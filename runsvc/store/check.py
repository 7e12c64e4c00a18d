"""The invariants of the store, checked on a live database (``runsvc check``, the fault tests).

Each check is one query that returns the rows breaking it, so a clean
database answers with nothing and a broken one names what is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import Connection, Subquery, and_, func, select

from runsvc.domain import ACTIVE_STATES, TERMINAL_STATES, JobState, RunState
from runsvc.store.schema import audit_events, jobs, runs

RUN_ENDED = "RUN_ENDED"  # the audit action of every terminal transition
_UNFINISHED = (JobState.QUEUED.value, JobState.IN_PROGRESS.value)


@dataclass(frozen=True)
class Violation:
    kind: str
    run_id: str | None
    detail: str

    def as_dict(self) -> dict[str, str | None]:
        return {"kind": self.kind, "run_id": self.run_id, "detail": self.detail}


def _ended_audits() -> Subquery:
    return (
        select(audit_events.c.run_id, func.count().label("n"))
        .where(audit_events.c.action == RUN_ENDED)
        .group_by(audit_events.c.run_id)
        .subquery()
    )


def violations(conn: Connection) -> list[Violation]:
    found: list[Violation] = []
    ended = _ended_audits()
    terminal = [s.value for s in TERMINAL_STATES]
    active = [s.value for s in ACTIVE_STATES]

    # One terminal transition per run: exactly one RUN_ENDED row per ended run.
    rows = conn.execute(
        select(runs.c.id, runs.c.state, func.coalesce(ended.c.n, 0))
        .select_from(runs.outerjoin(ended, ended.c.run_id == runs.c.id))
        .where(runs.c.state.in_(terminal), func.coalesce(ended.c.n, 0) != 1)
    )
    for run_id, state, n in rows:
        found.append(Violation("ENDED_RUN_AUDITS", run_id, f"{state} with {n} RUN_ENDED rows"))

    # ... and none for a run that is still active.
    rows = conn.execute(
        select(runs.c.id, runs.c.state, ended.c.n)
        .select_from(runs.join(ended, ended.c.run_id == runs.c.id))
        .where(runs.c.state.in_(active))
    )
    for run_id, state, n in rows:
        found.append(Violation("ACTIVE_RUN_ENDED", run_id, f"{state} with {n} RUN_ENDED rows"))

    # Every run and every job in exactly one known state.
    for run_id, state in conn.execute(
        select(runs.c.id, runs.c.state).where(runs.c.state.not_in([s.value for s in RunState]))
    ):
        found.append(Violation("RUN_STATE", run_id, f"unknown state {state!r}"))
    for run_id, job_id, state in conn.execute(
        select(jobs.c.run_id, jobs.c.id, jobs.c.state).where(
            jobs.c.state.not_in([s.value for s in JobState])
        )
    ):
        found.append(Violation("JOB_STATE", run_id, f"job {job_id}: unknown state {state!r}"))

    # No queued or in-progress job in an ended run; none in progress in a pending one.
    for run_id, state, n in conn.execute(
        select(runs.c.id, runs.c.state, func.count())
        .select_from(runs.join(jobs, jobs.c.run_id == runs.c.id))
        .where(
            (runs.c.state.in_(terminal) & jobs.c.state.in_(_UNFINISHED))
            | (
                (runs.c.state == RunState.PENDING.value)
                & (jobs.c.state == JobState.IN_PROGRESS.value)
            )
        )
        .group_by(runs.c.id, runs.c.state)
    ):
        found.append(Violation("UNFINISHED_JOBS", run_id, f"{state} run with {n} unfinished jobs"))

    # At most one active run per tenant.
    for tenant, n in conn.execute(
        select(runs.c.tenant_id, func.count())
        .where(runs.c.state.in_(active))
        .group_by(runs.c.tenant_id)
        .having(func.count() > 1)
    ):
        found.append(Violation("ACTIVE_RUNS", None, f"tenant {tenant} has {n} active runs"))

    # Counts consistent: a job belongs to its run's tenant.
    for run_id, n in conn.execute(
        select(runs.c.id, func.count())
        .select_from(
            runs.join(jobs, and_(jobs.c.run_id == runs.c.id, jobs.c.tenant_id != runs.c.tenant_id))
        )
        .group_by(runs.c.id)
    ):
        found.append(Violation("JOB_TENANT", run_id, f"{n} jobs of another tenant"))
    return found


def slot_violations(
    slots: Mapping[str, tuple[int | None, int]], *, pending_releases: int
) -> list[Violation]:
    """Slots in Redis against jobs in progress: ``{tenant: (in_use, in_progress)}``.

    With releases still waiting in the outbox Redis may hold more than is in
    progress (never fewer); with none waiting the two must be equal. None:
    Redis could not be read.
    """
    found = []
    for tenant, (in_use, in_progress) in sorted(slots.items()):
        if in_use is None:
            found.append(Violation("SLOTS_UNREADABLE", None, f"tenant {tenant}: Redis unavailable"))
        elif in_use < in_progress or (in_use > in_progress and pending_releases == 0):
            found.append(
                Violation(
                    "SLOTS",
                    None,
                    f"tenant {tenant}: {in_use} slots in Redis, {in_progress} jobs in progress, "
                    f"{pending_releases} releases pending",
                )
            )
    return found
