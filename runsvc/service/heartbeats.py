"""Heartbeats: many calls per statement (group commit), a batch of one when alone.

A heartbeat is the hot path: every live run sends one every few seconds.
A call queues its touch and waits; one flusher thread takes what has queued
(up to ``max_batch``, or whatever arrived within ``max_delay`` of the
oldest), writes it with one guarded statement in one transaction, and
answers each waiting call only after that commit. Fencing holds per touch:
a touch whose lease is not current matches nothing, and its call is refused
with the reason read afterwards. If the flush fails (the database is down),
every call of the batch gets that error. ``max_batch=1`` writes one
statement per heartbeat (the benchmark's naive reference).

The queue is bounded: when it is full a caller waits for room (back-pressure)
and gives up with UNAVAILABLE after ``enqueue_timeout``. ``close`` refuses
new calls, writes what is queued, and stops the flusher.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection

from runsvc.errors import Unavailable
from runsvc.service.context import Caller, Context, lease_lost
from runsvc.store import runs as run_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupCommit:
    """How heartbeats are batched."""

    max_batch: int = 256
    max_delay: float = 0.002  # seconds the oldest queued heartbeat may wait for company
    max_queue: int = 4096
    enqueue_timeout: float = 5.0


@dataclass(frozen=True)
class Beat:
    """A committed heartbeat: the run as the statement left it, and the transaction's time."""

    touched: run_store.Touched
    now: datetime


class Pending:
    """One queued heartbeat: its touch, then its outcome, and the caller waiting for it.

    The caller waits on a lock taken at creation, which the flusher releases once
    (a bare lock, not an Event: the hot path pays for one allocation, not three).
    """

    __slots__ = ("_done", "_on_answer", "beat", "error", "touch")

    def __init__(
        self, touch: run_store.LeaseTouch, on_answer: Callable[[], None] | None = None
    ) -> None:
        self.touch = touch
        self.beat: Beat | None = None
        self.error: BaseException | None = None
        self._on_answer = on_answer
        self._done = threading.Lock()
        self._done.acquire()

    def wait(self, timeout: float) -> bool:
        return self._done.acquire(timeout=timeout)

    def answer(self) -> None:
        self._done.release()
        if self._on_answer is not None:
            self._on_answer()


class Heartbeats:
    """Records heartbeats for the worker use cases; see the module docstring."""

    def __init__(self, ctx: Context, *, group_commit: GroupCommit | None = None) -> None:
        self._ctx = ctx
        self._policy = group_commit or GroupCommit()
        self._queue: deque[Pending] = deque()
        self._arrived: deque[float] = deque()  # monotonic arrival time of each queued touch
        lock = threading.Lock()
        self._not_empty = threading.Condition(lock)  # the flusher waits for work
        self._not_full = threading.Condition(lock)  # callers wait for room
        self._closing = False
        self._flusher = threading.Thread(
            target=self._flush_forever, name="heartbeat-flusher", daemon=True
        )
        self._flusher.start()

    def record(self, touch: run_store.LeaseTouch, *, caller: Caller) -> Beat:
        """Write one heartbeat; return once it has committed, or raise why it was refused."""
        waiting = self._enqueue(Pending(touch), self._policy)
        # The flusher answers every call it takes, even when its flush fails;
        # the bound only guards against a flusher that died.
        if not waiting.wait(self._policy.enqueue_timeout + 30):
            raise Unavailable("heartbeats are not being written")
        return self.outcome(waiting, caller=caller)

    def submit(self, touch: run_store.LeaseTouch, on_answer: Callable[[], None]) -> Pending:
        """Queue one heartbeat without waiting for it (for an event loop): ``on_answer`` runs
        on the flusher's thread once it is answered; :meth:`outcome` then tells how."""
        return self._enqueue(Pending(touch, on_answer), self._policy)

    def outcome(self, waiting: Pending, *, caller: Caller) -> Beat:
        """The committed heartbeat of an answered ``waiting``, or the reason it was refused."""
        touch = waiting.touch
        if isinstance(waiting.error, Unavailable):
            # One error per call: the batch's exception is shared by many threads.
            raise Unavailable(str(waiting.error)) from waiting.error
        if waiting.error is not None:
            raise RuntimeError("writing a batch of heartbeats failed") from waiting.error
        if waiting.beat is not None:
            return waiting.beat
        return self._ctx.transact(lambda conn, now, notes: self._refuse(conn, touch), caller=caller)

    def after_commit(self, beats: Sequence[Beat]) -> None:
        """Called once per commit of heartbeats, outside the transaction, before they are answered.

        The place for work that must follow a committed heartbeat but is no
        part of the database's truth (refreshing a slot backend's leases, for
        example). It must not raise; if it does, the error is logged and the
        heartbeats are still answered, since they committed.
        """
        for beat in beats:
            # The lease holder is alive: its concurrency slots must not expire.
            self._ctx.slots.keep_alive(
                tenant_id=beat.touched.tenant_id,
                run_id=beat.touched.run_id,
                lease_epoch=beat.touched.lease_epoch,
            )

    def close(self) -> None:
        """Refuse new heartbeats, write the queued ones, stop the flusher."""
        with self._not_empty:
            self._closing = True
            self._not_empty.notify_all()
            self._not_full.notify_all()
        self._flusher.join()

    def _refuse(self, conn: Connection, touch: run_store.LeaseTouch) -> Beat:
        """Why a touch matched nothing (read after the batch committed), as the error."""
        run = self._ctx.leased_run(
            conn, touch.run_id, tenant_id=touch.tenant_id, worker=touch.worker
        )
        raise lease_lost(run, touch.lease_epoch)

    def _enqueue(self, waiting: Pending, policy: GroupCommit) -> Pending:
        deadline = time.monotonic() + policy.enqueue_timeout
        with self._not_full:
            while not self._closing and len(self._queue) >= policy.max_queue:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Unavailable("too many heartbeats are waiting to be written")
                self._not_full.wait(remaining)
            if self._closing:
                raise Unavailable("the server is shutting down")
            self._queue.append(waiting)
            self._arrived.append(time.monotonic())
            # The flusher needs waking only for the first heartbeat of a batch and for
            # a full one; between the two it sleeps until the oldest has waited enough.
            if len(self._queue) == 1 or len(self._queue) == policy.max_batch:
                self._not_empty.notify()
        return waiting

    def _next_batch(self, policy: GroupCommit) -> list[Pending] | None:
        with self._not_empty:
            while not self._queue:
                if self._closing:
                    return None
                self._not_empty.wait()
            flush_at = self._arrived[0] + policy.max_delay
            while len(self._queue) < policy.max_batch and not self._closing:
                remaining = flush_at - time.monotonic()
                if remaining <= 0:
                    break
                self._not_empty.wait(remaining)
            size = min(len(self._queue), policy.max_batch)
            batch = [self._queue.popleft() for _ in range(size)]
            for _ in range(size):
                self._arrived.popleft()
            self._not_full.notify_all()  # room for callers waiting on a full queue
            return batch

    def _flush_forever(self) -> None:
        while (batch := self._next_batch(self._policy)) is not None:
            self._flush(batch)

    def _flush(self, batch: list[Pending]) -> None:
        def work(conn: Connection) -> tuple[datetime, list[run_store.Touched]]:
            now = self._ctx.clock.now(conn)  # one clock reading for the whole batch
            return now, run_store.touch_leases(conn, [w.touch for w in batch], now=now)

        try:
            now, rows = self._ctx.db.run(work)
        except Exception as error:
            if not isinstance(error, Unavailable):
                log.exception("writing a batch of heartbeats failed")
            for waiting in batch:
                waiting.error = error
                waiting.answer()
            return
        by_run: dict[str, list[run_store.Touched]] = {}
        for row in rows:
            by_run.setdefault(row.run_id, []).append(row)
        beats = []
        for waiting in batch:
            candidates = by_run.get(waiting.touch.run_id, ())
            match = next((r for r in candidates if r.answers(waiting.touch)), None)
            if match is not None:
                waiting.beat = Beat(match, now)
                beats.append(waiting.beat)
        if beats:
            try:
                self.after_commit(beats)
            except Exception:
                log.exception("after-commit work for heartbeats failed")
        for waiting in batch:
            waiting.answer()
