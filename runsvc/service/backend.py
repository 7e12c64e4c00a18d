"""What the web backend and operators do: create, look up, list and cancel runs."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection

from runsvc.domain import (
    LARGEST_RUN_NUMBER,
    Event,
    JobSpec,
    Run,
    RunState,
    StopReason,
    run_number,
)
from runsvc.errors import (
    ActiveRunExists,
    InvalidTransition,
    NoActiveRun,
    RunNotVisible,
)
from runsvc.service.context import Caller, Context, Ending, Notes
from runsvc.service.paging import PageTokens
from runsvc.slots import SlotRelease
from runsvc.store import jobs as job_store
from runsvc.store import runs as run_store
from runsvc.validation import Checker, Limits, check_jobs

_CANCEL_ATTEMPTS = 3


@dataclass(frozen=True)
class ForceCancelled:
    run: Run
    cancelled_jobs: int
    # Slots this call freed in the database's accounting.
    released_slots: int
    release: SlotRelease | None = None

    @property
    def pending_slot_releases(self) -> int:
        """Of ``released_slots``, how many the slot store had not yet been told of on return."""
        if self.release is None or self.release.applied:
            return 0
        return self.release.count


@dataclass(frozen=True)
class Page:
    runs: list[Run]
    next_page_token: str


def _check_run_ref(check: Checker, ref: str) -> None:
    number = run_number(ref)
    if number is None:
        check.object_id("run_id", ref)
    elif not 1 <= number <= LARGEST_RUN_NUMBER:
        check.fail("run_id", f"a run number is between 1 and {LARGEST_RUN_NUMBER}")


def _already_ended(run: Run) -> InvalidTransition:
    return InvalidTransition(
        f"the run already ended as {run.state.value}",
        metadata={"run_id": run.id, "state": run.state.value},
    )


class BackendUseCases:
    def __init__(self, ctx: Context, limits: Limits, pages: PageTokens) -> None:
        self._ctx = ctx
        self._limits = limits
        self._pages = pages

    def create_run(
        self, *, tenant_id: str, request_id: str, jobs: Sequence[JobSpec], caller: Caller
    ) -> Run:
        check = Checker()
        check.identifier("request_id", request_id, max_length=self._limits.max_id_length)
        check_jobs(check, jobs, self._limits)
        check.done()

        def work(conn: Connection, now: datetime, notes: Notes) -> Run:
            existing = run_store.get_by_request(conn, request_id, tenant_id=tenant_id)
            if existing is not None:
                return existing
            run_id = str(uuid.uuid4())
            try:
                run_store.insert(
                    conn, tenant_id=tenant_id, run_id=run_id, request_id=request_id, now=now
                )
            except run_store.DuplicateRun:
                # Lost a race: the same request created it meanwhile, or another run is active.
                existing = run_store.get_by_request(conn, request_id, tenant_id=tenant_id)
                if existing is not None:
                    return existing
                active = run_store.get_active(conn, tenant_id=tenant_id)
                raise ActiveRunExists(active.id if active else "") from None
            job_store.insert_many(conn, run_id, jobs, tenant_id=tenant_id, now=now)
            created = run_store.get(conn, run_id, tenant_id=tenant_id)
            assert created is not None
            return created

        return self._ctx.transact(work, caller=caller)

    def get_active(self, *, tenant_id: str, caller: Caller) -> Run:
        """The tenant's live run; a run whose worker went silent is finalized, never reported."""
        run = self._read_live(lambda conn: run_store.get_active(conn, tenant_id=tenant_id), caller)
        if run is None:
            raise NoActiveRun()
        return run

    def get_run(self, *, tenant_id: str | None, run_id: str, caller: Caller) -> Run:
        check = Checker()
        _check_run_ref(check, run_id)
        check.done()
        run = self._read_live(
            lambda conn: run_store.get_by_ref(conn, run_id, tenant_id=tenant_id),
            caller,
            missing=RunNotVisible(run_id=run_id, tenant_id=tenant_id),
        )
        assert run is not None
        return run

    def _read_live(
        self,
        find: Callable[[Connection], Run | None],
        caller: Caller,
        *,
        missing: RunNotVisible | None = None,
    ) -> Run | None:
        """The run ``find`` reads, as it is now: in one statement when that settles it, else
        in a transaction that first ends it if its worker went silent (stale detection on
        read, the guarded finalization the reaper uses) and reads it again. ``missing`` is
        raised in that transaction when nothing is found, so the refused look-up is audited."""
        settled = self._ctx.read_settled(find)
        if settled is not None:
            return settled

        def work(conn: Connection, now: datetime, notes: Notes) -> Run | None:
            run = find(conn)
            if run is None and missing is not None:
                raise missing
            horizon = None if run is None else self._ctx.silent_since(run, now)
            if run is None or horizon is None:
                return run
            ended = self._ctx.end_lost(
                conn,
                notes,
                [run_store.SilentRun(run.id, run.tenant_id, run.cancel_requested)],
                now=now,
                silent_since=horizon,
                reason=StopReason.HEARTBEAT_TIMEOUT,
                detected_by="read",
                caller=caller,
            )
            return find(conn) if ended else run

        return self._ctx.transact(work, caller=caller)

    def _check_cancel(self, ref: str, reason: str) -> None:
        check = Checker()
        _check_run_ref(check, ref)
        check.text("reason", reason, max_length=self._limits.max_text_length)
        check.done()

    def _resolve(self, conn: Connection, ref: str, tenant_id: str | None) -> str:
        """The run id that ``ref`` (an id, or a number) names, if the tenant may see it."""
        number = run_number(ref)
        if number is None:
            return ref
        run = run_store.get_by_ref(conn, ref, tenant_id=tenant_id)
        if run is None:
            raise RunNotVisible(run_id=ref, tenant_id=tenant_id)
        return run.id

    def _visible(self, conn: Connection, run_id: str, tenant_id: str | None) -> Run:
        run = run_store.get(conn, run_id, tenant_id=tenant_id)
        if run is None:
            raise RunNotVisible(run_id=run_id, tenant_id=tenant_id)
        return run

    def list_runs(
        self,
        *,
        tenant_id: str | None,
        states: Sequence[RunState],
        page_size: int,
        page_token: str,
        caller: Caller,
    ) -> Page:
        check = Checker()
        check.count("page_size", page_size, low=0, high=self._limits.max_page_size)
        check.done()
        after = self._pages.decode(page_token) if page_token else None
        size = page_size or self._limits.default_page_size

        def work(conn: Connection, now: datetime, notes: Notes) -> Page:
            found = run_store.list_page(
                conn, tenant_id=tenant_id, states=states, after=after, limit=size + 1
            )
            more = len(found) > size
            shown = found[:size]
            return Page(shown, self._pages.encode(shown[-1]) if more else "")

        return self._ctx.transact(work, caller=caller)

    def cancel(self, *, tenant_id: str | None, run_id: str, reason: str, caller: Caller) -> Run:
        """Cooperative cancel; idempotent. A pending run has no worker to ask, so it ends now."""
        ref = run_id
        self._check_cancel(run_id, reason)

        def work(conn: Connection, now: datetime, notes: Notes) -> Run:
            run_id = self._resolve(conn, ref, tenant_id)
            for _ in range(_CANCEL_ATTEMPTS):
                run = self._visible(conn, run_id, tenant_id)
                if run.state is RunState.PENDING:
                    ending = Ending(
                        Event.CANCEL_PENDING,
                        StopReason.CANCELLED_BY_USER,
                        run_store.Guard(),
                        tag="RUN_ENDED",
                        detected_by="cancel",
                        caller=caller,
                        cancel_reason=reason or None,
                    )
                    self._ctx.end_runs(conn, notes, [run_id], ending, tenant_id=tenant_id, now=now)
                elif run.state is RunState.RUNNING and not run.cancel_requested:
                    run_store.request_cancel(
                        conn, run_id, tenant_id=tenant_id, reason=reason, now=now
                    )
                elif run.state is RunState.RUNNING or run.state is RunState.CANCELLED:
                    return run
                else:
                    raise _already_ended(run)
            return self._visible(conn, run_id, tenant_id)

        return self._ctx.transact(work, caller=caller)

    def force_cancel(
        self, *, tenant_id: str | None, run_id: str, reason: str, caller: Caller
    ) -> ForceCancelled:
        """Immediate and final, whether or not the worker is alive; idempotent."""
        ref = run_id
        self._check_cancel(run_id, reason)

        def work(conn: Connection, now: datetime, notes: Notes) -> ForceCancelled:
            run_id = self._resolve(conn, ref, tenant_id)
            ending = Ending(
                Event.FORCE_CANCEL,
                StopReason.FORCE_CANCELLED,
                run_store.Guard(),
                tag="FORCE_CANCEL",
                detected_by="force_cancel",
                caller=caller,
                cancel_reason=reason or None,
            )
            ended = self._ctx.end_runs(conn, notes, [run_id], ending, tenant_id=tenant_id, now=now)
            run = self._visible(conn, run_id, tenant_id)
            for one in ended:
                return ForceCancelled(run, one.failed_jobs, one.released_slots, one.release)
            if run.state is RunState.CANCELLED:
                return ForceCancelled(run, 0, 0)
            raise _already_ended(run)

        return self._ctx.transact(work, caller=caller)
