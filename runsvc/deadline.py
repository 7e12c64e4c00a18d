"""The current call's deadline (a ``time.monotonic()`` instant), capped by the server.

Set by the gRPC edge for the duration of one call; the store bounds every
PostgreSQL statement by the time left (``statement_timeout``), so that no
request, however slow its query, holds a server thread past its deadline.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "runsvc_deadline", default=None
)


def remaining() -> float | None:
    """Seconds left for the current call, None outside of one or without a deadline."""
    instant = _deadline.get()
    return None if instant is None else instant - time.monotonic()


@contextmanager
def bound(instant: float | None) -> Iterator[None]:
    """``instant`` is the deadline of whatever runs inside the block."""
    token = _deadline.set(instant)
    try:
        yield
    finally:
        _deadline.reset(token)
