"""Use cases: each owns its transaction; no transport types below this line."""

from __future__ import annotations

from runsvc.clock import Clock
from runsvc.domain import LivenessPolicy
from runsvc.service.acquire import JobTaking, TakeCounted
from runsvc.service.backend import BackendUseCases
from runsvc.service.context import Caller, Context
from runsvc.service.heartbeats import GroupCommit, Heartbeats
from runsvc.service.observer import Observer
from runsvc.service.paging import PageTokens
from runsvc.service.worker import WorkerUseCases
from runsvc.slots import Slots
from runsvc.store.engine import Database
from runsvc.validation import Limits


class RunService:
    """Everything runsvc does with runs, for workers and for the backend."""

    def __init__(
        self,
        *,
        db: Database,
        clock: Clock,
        slots: Slots,
        policy: LivenessPolicy,
        limits: Limits | None = None,
        observer: Observer | None = None,
        group_commit: GroupCommit | None = None,
        page_key: bytes | None = None,
        taking: JobTaking | None = None,
    ) -> None:
        """``taking``: how AcquireJobs takes jobs within the slots (default: counted in the
        transaction, for slots that live in the database; see runsvc.service.acquire)."""
        self.context = Context(db=db, clock=clock, slots=slots, policy=policy, observer=observer)
        limits = limits or Limits()
        self.heartbeats = Heartbeats(self.context, group_commit=group_commit)
        self.worker = WorkerUseCases(
            self.context, limits, self.heartbeats, taking or TakeCounted(slots)
        )
        self.backend = BackendUseCases(self.context, limits, PageTokens(page_key))

    def close(self) -> None:
        """Write what is still queued (heartbeats); call after the last request was served."""
        self.heartbeats.close()


__all__ = ["Caller", "GroupCommit", "RunService"]
