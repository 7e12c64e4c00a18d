"""Streams of the open services: a few at once, each for a bounded time.

Health and reflection answer without a token (probes and tools have none),
and their streaming methods (``Health/Watch``, ``ServerReflectionInfo``) hold a
server thread and a slot of ``maximum_concurrent_rpcs`` for as long as the
peer keeps them open. Left alone, a tokenless peer that opens a few dozen of
them stops every other call. So each such stream must first take one of a few
slots of its own (none free: ``RESOURCE_EXHAUSTED`` at once, nothing queued)
and is cancelled when its lifetime is over; a health watcher reconnects.

The slot is taken on the pool thread that runs the stream and given back when
the stream ends, however it ends (finished, cancelled by either side, or the
peer gone): taking it before the call reaches a thread could leak it when
the call never does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc

REFUSED_MESSAGE = "too many open streams; try again later"


class OpenStreams:
    """Admits at most ``limit`` open-service streams at once, each for ``lifetime_seconds``."""

    def __init__(
        self,
        *,
        limit: int,
        lifetime_seconds: float,
        on_refused: Callable[[], None] = lambda: None,
    ) -> None:
        self._slots = threading.BoundedSemaphore(limit)
        self._lifetime = lifetime_seconds
        self._on_refused = on_refused

    def admit(self, context: grpc.ServicerContext) -> _Admission:
        """The stream's admission, held while it runs; aborts RESOURCE_EXHAUSTED when full."""
        if not self._slots.acquire(blocking=False):
            self._on_refused()
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, REFUSED_MESSAGE)
        return _Admission(self._slots, context, self._lifetime)


class _Admission:
    """One admitted stream: its slot, given back once, and the timer that ends it."""

    def __init__(
        self, slots: threading.BoundedSemaphore, context: grpc.ServicerContext, lifetime: float
    ) -> None:
        self._slots = slots
        self._lock = threading.Lock()
        self._held = True
        self._timer = threading.Timer(lifetime, context.cancel)
        self._timer.daemon = True
        # The stream may end while its thread is blocked (a watcher waiting for a
        # change): the termination callback gives the slot back then, too.
        context.add_callback(self.release)

    def __enter__(self) -> None:
        self._timer.start()

    def __exit__(self, *_exc: object) -> None:
        self.release()

    def release(self) -> None:
        self._timer.cancel()
        with self._lock:
            if not self._held:
                return
            self._held = False
        self._slots.release()
