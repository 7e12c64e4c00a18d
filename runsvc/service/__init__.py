"""Use cases: each owns its transaction; no transport types below this line."""

from __future__ import annotations

from runsvc.clock import Clock
from runsvc.domain import LivenessPolicy
from runsvc.service.backend import BackendUseCases
from runsvc.service.context import Caller, Context
from runsvc.service.observer import Observer
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
    ) -> None:
        self.context = Context(db=db, clock=clock, slots=slots, policy=policy, observer=observer)
        limits = limits or Limits()
        self.worker = WorkerUseCases(self.context, limits)
        self.backend = BackendUseCases(self.context, limits)


__all__ = ["Caller", "RunService"]
