"""Bind a request id and the method to every log line of a call.

The id is the caller's ``x-request-id`` metadata when it is a sane token
(so that a backend's id follows the call through), otherwise a new one.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from runsvc import logs
from runsvc.api.handlers import wrap

REQUEST_ID_HEADER = "x-request-id"
_SANE = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def request_id(metadata: Any) -> str:
    """The caller's request id if it is a sane token, else a fresh one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and _SANE.fullmatch(value):
            return value
    return uuid.uuid4().hex


class RequestContextInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    def intercept_service(
        self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        rid = request_id(details.invocation_metadata)

        @contextmanager
        def around(_context: grpc.ServicerContext) -> Iterator[None]:
            with logs.bound(request_id=rid, rpc=details.method):
                yield

        return wrap(handler, around)
