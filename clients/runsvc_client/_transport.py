"""One place where a stub call is made: token, deadline, retries, error translation."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from runsvc_client.balancing import Target, balanced_channel
from runsvc_client.errors import from_rpc_error
from runsvc_client.retry import TRANSIENT_CODES, RetryPolicy
from runsvc_client.v1 import run_service_pb2_grpc as pb_grpc

Response = TypeVar("Response")

TokenSource = str | Callable[[], str]
"""A bearer token, or a function returning a fresh one for each call."""


class Transport:
    """Calls RunService methods on a channel with a bearer token.

    Owns the channel only when it opened it (from a target or a list of
    addresses: :func:`runsvc_client.balancing.balanced_channel`).
    """

    def __init__(
        self,
        target: Target | grpc.Channel,
        *,
        token: TokenSource,
        timeout: float,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if isinstance(target, grpc.Channel):
            self.channel = target
            self._owns_channel = False
        else:
            self.channel = balanced_channel(target)
            self._owns_channel = True
        # The generated stub module has no type stubs; calls go through call().
        self.stub: Any = pb_grpc.RunServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self._token = token
        self.timeout = timeout

    def _metadata(self) -> list[tuple[str, str]]:
        token = self._token() if callable(self._token) else self._token
        return [("authorization", f"Bearer {token}")]

    def call(
        self,
        method: str,
        request: Any,
        *,
        retry: RetryPolicy,
        timeout: float | None = None,
        stop: threading.Event | None = None,
    ) -> Any:
        """The response of ``method``; a RunsvcError (``from`` the gRPC error) otherwise.

        Retries only what ``retry`` allows: pass ``NO_RETRY`` for a call that
        is not safe to repeat. ``stop`` cuts the waits between retries short.
        """
        rpc: Callable[..., Any] = getattr(self.stub, method)
        attempt = 0
        while True:
            try:
                return rpc(
                    request,
                    timeout=self.timeout if timeout is None else timeout,
                    metadata=self._metadata(),
                )
            except grpc.RpcError as error:
                code = error.code() if isinstance(error, grpc.Call) else None
                last = attempt + 1 >= retry.attempts
                if code not in TRANSIENT_CODES or last:
                    raise from_rpc_error(error) from error
                pause = retry.backoff(attempt)
                if stop is None:
                    time.sleep(pause)
                elif stop.wait(pause):
                    raise from_rpc_error(error) from error
                attempt += 1

    def close(self) -> None:
        if self._owns_channel:
            self.channel.close()
