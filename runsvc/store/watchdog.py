"""Cuts a PostgreSQL connection whose transaction outlives its bound.

``statement_timeout`` is enforced by the server, so it cannot help when the
server is unreachable: behind a partition (packets dropped, no RST) a read
waits for TCP to give up, many minutes later, and the call's thread with it.
The watchdog shuts the connection's socket down once the bound has passed;
the blocked read returns at once, the driver reports a lost connection, the
pool drops it, and the caller gets UNAVAILABLE within its deadline.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import socket
import threading
import time
from typing import Any

log = logging.getLogger(__name__)


class Watchdog:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._armed: dict[int, Any] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.cuts = 0

    def arm(self, dbapi_connection: Any, seconds: float) -> int:
        """Cut ``dbapi_connection`` in ``seconds`` unless disarmed before."""
        with self._cond:
            token = next(self._ids)
            self._armed[token] = dbapi_connection
            due = time.monotonic() + seconds
            # Wake the watcher only when it must wake earlier than it planned to.
            earlier = not self._heap or due < self._heap[0][0]
            heapq.heappush(self._heap, (due, token))
            if self._thread is None:
                self._stop = threading.Event()
                self._thread = threading.Thread(
                    target=self._watch, args=(self._stop,), daemon=True, name="runsvc-db-watchdog"
                )
                self._thread.start()
            if earlier:
                self._cond.notify()
            return token

    def disarm(self, token: int) -> None:
        with self._cond:
            self._armed.pop(token, None)

    def stop(self) -> None:
        """End the watcher thread (its engine is disposed); a later ``arm`` starts another."""
        with self._cond:
            thread, self._thread = self._thread, None
            self._stop.set()
            self._cond.notify_all()
        if thread is not None:
            thread.join(timeout=5.0)

    def _watch(self, stop: threading.Event) -> None:
        with self._cond:
            while not stop.is_set():
                while self._heap and self._heap[0][1] not in self._armed:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait(5.0)
                    continue
                due, token = self._heap[0]
                wait = due - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
                # Cut under the lock: the transaction cannot end (disarm) and its
                # connection go to another caller meanwhile.
                self._cut(self._armed.pop(token))

    def _cut(self, dbapi_connection: Any) -> None:
        self.cuts += 1
        log.warning("a database call outlived its deadline: its connection is cut")
        with contextlib.suppress(OSError, AttributeError, ValueError):
            sock = socket.socket(fileno=os.dup(dbapi_connection.fileno()))
            try:
                sock.shutdown(socket.SHUT_RDWR)
            finally:
                sock.close()
