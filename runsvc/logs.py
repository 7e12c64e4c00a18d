"""One JSON object per log line. Audit events carry their tag at the top level.

Every line logged while a gRPC call is served also carries the call's
``request_id``, ``rpc`` and, once the caller is known, its ``tenant``: the
interceptors bind them in context variables (:func:`bound`), which are per
thread of the server's pool and reset when the call ends.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}

CALL_FIELDS = ("request_id", "rpc", "tenant")
_call: dict[str, contextvars.ContextVar[str | None]] = {
    name: contextvars.ContextVar(f"runsvc_log_{name}", default=None) for name in CALL_FIELDS
}


@contextmanager
def bound(**fields: str | None) -> Iterator[None]:
    """Add ``fields`` (some of :data:`CALL_FIELDS`) to every line logged inside the block."""
    tokens = [(_call[name], _call[name].set(value)) for name, value in fields.items()]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


# A request id to make only if the call logs something (most calls log nothing).
FRESH_REQUEST_ID = "\x00fresh"


def call_fields() -> dict[str, str]:
    """The fields bound for the call being served on this thread."""
    fields = {name: value for name, var in _call.items() if (value := var.get()) is not None}
    if fields.get("request_id") == FRESH_REQUEST_ID:
        # Made on the call's first log line and kept for its next ones; the binding's
        # reset at the end of the call undoes this too.
        fields["request_id"] = uuid.uuid4().hex
        _call["request_id"].set(fields["request_id"])
    return fields


class JsonFormatter(logging.Formatter):
    def __init__(self, fields: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        # On every line: which process of `serve --workers N` wrote it.
        self._fields = dict(fields or {})

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **self._fields,
            **call_fields(),
        }
        for key, value in record.__dict__.items():
            if key == "audit" and isinstance(value, dict):
                line.update(value)
            elif key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(level: str = "INFO", *, fields: Mapping[str, Any] | None = None) -> None:
    """JSON lines on stderr at ``level``; ``fields`` are added to every line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(fields))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
