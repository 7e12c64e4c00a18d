"""The pure domain: run and job states, the transition table, liveness rules.

Nothing here touches a database, a network or the wall clock. The store turns
each transition into one guarded statement whose ``WHERE state IN (...)`` comes
from :data:`TRANSITIONS`, so the table below is the single place that says
which state changes are legal.
"""

from __future__ import annotations

import enum
import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import ClassVar


class RunState(enum.StrEnum):
    PENDING = "PENDING"  # created, no worker yet
    RUNNING = "RUNNING"  # a worker holds the lease
    COMPLETED = "COMPLETED"  # the worker finished it
    CANCELLED = "CANCELLED"  # cancel acknowledged, force-cancelled, or lost while cancelling
    STOPPED = "STOPPED"  # liveness lost
    FAILED = "FAILED"  # the worker reported a fatal error


ACTIVE_STATES = frozenset({RunState.PENDING, RunState.RUNNING})
TERMINAL_STATES = frozenset(set(RunState) - ACTIVE_STATES)


class JobState(enum.StrEnum):
    QUEUED = "QUEUED"
    IN_PROGRESS = "IN_PROGRESS"  # handed to the lease holder; holds a concurrency slot
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


class JobOutcome(enum.StrEnum):
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


class RunOutcome(enum.StrEnum):
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class StopReason(enum.StrEnum):
    """Why a run (or its unfinished jobs) ended other than by finishing normally."""

    HEARTBEAT_TIMEOUT = "HEARTBEAT_TIMEOUT"  # no heartbeat within the stale threshold
    STARTUP_CLEANUP = "STARTUP_CLEANUP"  # silent for the startup horizon when a server started
    EMPTY_QUEUE = "EMPTY_QUEUE"  # silent with nothing left to do
    CANCELLED_BY_USER = "CANCELLED_BY_USER"  # a cancel request, acknowledged or on a pending run
    CANCEL_TIMEOUT = "CANCEL_TIMEOUT"  # a cancel request the worker never acknowledged
    FORCE_CANCELLED = "FORCE_CANCELLED"  # ForceCancel
    WORKER_FAILED = "WORKER_FAILED"  # FinishRun with outcome FAILED
    WORKER_LOST = "WORKER_LOST"  # for a job in progress when its run ended


class Event(enum.StrEnum):
    CLAIM = "CLAIM"  # a worker takes a pending run
    RESUME = "RESUME"  # the same worker takes its running run again
    FINISH_COMPLETED = "FINISH_COMPLETED"
    FINISH_FAILED = "FINISH_FAILED"
    FINISH_CANCELLED = "FINISH_CANCELLED"
    CANCEL_PENDING = "CANCEL_PENDING"  # cancel of a run nobody holds ends it at once
    FORCE_CANCEL = "FORCE_CANCEL"
    LOST = "LOST"  # liveness lost, no cancel requested
    LOST_WHILE_CANCELLING = "LOST_WHILE_CANCELLING"  # liveness lost after a cancel request


TRANSITIONS: Mapping[tuple[RunState, Event], RunState] = {
    (RunState.PENDING, Event.CLAIM): RunState.RUNNING,
    (RunState.RUNNING, Event.RESUME): RunState.RUNNING,
    (RunState.RUNNING, Event.FINISH_COMPLETED): RunState.COMPLETED,
    (RunState.RUNNING, Event.FINISH_FAILED): RunState.FAILED,
    (RunState.RUNNING, Event.FINISH_CANCELLED): RunState.CANCELLED,
    (RunState.PENDING, Event.CANCEL_PENDING): RunState.CANCELLED,
    (RunState.PENDING, Event.FORCE_CANCEL): RunState.CANCELLED,
    (RunState.RUNNING, Event.FORCE_CANCEL): RunState.CANCELLED,
    (RunState.RUNNING, Event.LOST): RunState.STOPPED,
    (RunState.RUNNING, Event.LOST_WHILE_CANCELLING): RunState.CANCELLED,
}


def sources(event: Event) -> frozenset[RunState]:
    """The states from which ``event`` may fire: the guard of its statement."""
    return frozenset(src for (src, ev) in TRANSITIONS if ev is event)


def target(event: Event) -> RunState:
    """The state that ``event`` leads to (the same from every source)."""
    targets = {dst for (_, ev), dst in TRANSITIONS.items() if ev is event}
    if len(targets) != 1:  # pragma: no cover - guarded by a unit test on the table
        raise AssertionError(f"event {event} has targets {targets}")
    return targets.pop()


FINISH_EVENTS: Mapping[RunOutcome, Event] = {
    RunOutcome.COMPLETED: Event.FINISH_COMPLETED,
    RunOutcome.FAILED: Event.FINISH_FAILED,
    RunOutcome.CANCELLED: Event.FINISH_CANCELLED,
}


@dataclass(frozen=True)
class JobCounts:
    total: int = 0
    queued: int = 0
    in_progress: int = 0
    completed: int = 0
    failed: int = 0


# Run numbers are BIGINTs in the store: 1 up to this.
LARGEST_RUN_NUMBER = 2**63 - 1


def run_number(ref: str) -> int | None:
    """The number a run reference names when it is all ASCII digits; None for a run id."""
    return int(ref) if ref.isascii() and ref.isdigit() else None


def holds_lease(worker: str | None, worker_id: str | None) -> bool:
    """Whether the worker identity ``worker`` holds a lease taken as ``worker_id``: it is
    that identity or one of its processes (``worker/…``). ``worker`` None: a caller not
    bound to an identity, which any holder's lease answers. The store's SQL twin is
    :func:`runsvc.store.runs.held_by`."""
    if worker is None:
        return True
    return worker_id is not None and (worker_id == worker or worker_id.startswith(worker + "/"))


@dataclass(frozen=True)
class Run:
    id: str
    tenant_id: str
    state: RunState
    request_id: str
    lease_epoch: int
    cancel_requested: bool
    create_time: datetime
    stop_reason: str | None = None
    cancel_reason: str | None = None
    cancel_request_time: datetime | None = None
    worker_id: str | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    last_heartbeat_time: datetime | None = None
    job_counts: JobCounts = JobCounts()
    # Unique and increasing, assigned by the database: how people name a run.
    number: int = 0

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


@dataclass(frozen=True)
class Job:
    id: str
    run_id: str
    external_id: str
    payload: bytes
    state: JobState
    error: str | None = None
    late: bool = False


@dataclass(frozen=True)
class JobSpec:
    external_id: str
    payload: bytes


@dataclass(frozen=True)
class JobResult:
    job_id: str
    outcome: JobOutcome
    error: str | None = None


@dataclass(frozen=True)
class Finalization:
    """How a run that lost its worker ends: its event, final state and reason."""

    event: Event
    reason: StopReason

    @property
    def state(self) -> RunState:
        return target(self.event)


def finalization_for_lost_run(*, cancel_requested: bool, reason: StopReason) -> Finalization:
    """A silent run that had a cancel request ends CANCELLED, any other STOPPED."""
    if cancel_requested:
        return Finalization(Event.LOST_WHILE_CANCELLING, StopReason.CANCELLED_BY_USER)
    return Finalization(Event.LOST, reason)


@dataclass(frozen=True)
class LivenessPolicy:
    """The seed's rules; every value is a setting.

    A running run is stale once its last sign of life (heartbeat, else the
    claim's ``lock_ts``, else ``updated_at``) is older than ``stale_after``.
    """

    stale_after: timedelta = timedelta(seconds=30)
    startup_cleanup_after: timedelta = timedelta(minutes=5)
    cancel_grace: timedelta = timedelta(seconds=60)

    def stale_horizon(self, now: datetime) -> datetime:
        return now - self.stale_after

    def startup_horizon(self, now: datetime) -> datetime:
        return now - self.startup_cleanup_after

    def cancel_horizon(self, now: datetime) -> datetime:
        return now - self.cancel_grace

    def stale_time(self, last_heartbeat: datetime) -> datetime:
        """When a run whose last heartbeat is ``last_heartbeat`` becomes stale."""
        return last_heartbeat + self.stale_after

    # The breaker: a pass that would stop more than this share of the running
    # runs stops none, once at least ``breaker_min_running`` runs are running.
    breaker_share: float = 0.5
    breaker_min_running: int = 4

    def trusted_stale_horizon(
        self, now: datetime, trusted_since: datetime | None
    ) -> datetime | None:
        """The stale horizon, or None while nothing may be judged stale.

        A run is stale only if ``now - max(last_sign_of_life, trusted_since)``
        exceeds ``stale_after``: a replica counts silence from no earlier than
        the moment it last regained uninterrupted database access (or started),
        since a heartbeat sent while it could not reach the database could not
        have been recorded. As ``max`` splits into two conditions, that is the
        usual horizon, open only once ``trusted_since`` itself is past it.
        ``trusted_since`` None: the replica has no database access it trusts.
        """
        horizon = self.stale_horizon(now)
        if trusted_since is None or trusted_since >= horizon:
            return None
        return horizon

    def breaker_trips(self, *, stale: int, running: int) -> bool:
        """Whether stopping ``stale`` of ``running`` runs at once looks like an outage."""
        return running >= self.breaker_min_running and stale > self.breaker_share * running


@dataclass(frozen=True)
class HeldSlot:
    """One job's slot, named by its run, the lease epoch that took it, its job and a token.

    The token is new for every AcquireJobs call (:func:`grant_token`), so two
    calls never share a name (tries of one call do: a name granted again is held
    again) and releasing it can only ever free that one grant.
    """

    run_id: str
    lease_epoch: int
    job_id: str
    token: str

    SEPARATOR: ClassVar[str] = "|"

    @property
    def member(self) -> str:
        return self.SEPARATOR.join((self.run_id, str(self.lease_epoch), self.job_id, self.token))

    @classmethod
    def parse(cls, member: str) -> HeldSlot:
        run_id, epoch, job_id, token = member.split(cls.SEPARATOR)
        return cls(run_id, int(epoch), job_id, token)


def grant_token(request_id: str) -> str:
    """The token of one AcquireJobs call, stored on the jobs it takes.

    Derived from the caller's ``request_id`` when it gives one, so that a repeat
    of a call whose answer was lost finds the jobs the first one took; any
    request id becomes a fixed-length token without the slot name's separator.
    A job is taken once, so a token reused by a later call still names new slots.
    """
    if not request_id:
        return uuid.uuid4().hex[:16]
    return hashlib.sha256(request_id.encode()).hexdigest()[:16]
