"""The gRPC edge: one interceptor for every call, its per-method work decided once.

The sync server asks its interceptors for a method's handler on its one serving
thread, under its lock, for every call: whatever they do there is paid once per
call by the whole server. So :class:`Edge` builds each method's handler the first
time the method is called and answers later calls from a table; everything that
belongs to one call (its request id and log fields, metrics, authentication,
rate limit, role, deadline, decoding) runs inside that handler, on a worker
thread, in one function rather than a stack of wrappers.

Where a call runs, and which calls wait rather than fail when the server is busy:

- health ``Check`` (and any open-service call) runs on a small pool of its own,
  so a probe never queues behind busy RPC threads;
- ``Heartbeat`` runs on a pool of its own, sized so that many heartbeats can
  wait together for one group commit, and is never shed: a refused heartbeat is
  a step toward a false stop;
- every other call runs on the main pool; once ``max_in_flight`` of them are
  running or queued there, new ones are shed at once (RESOURCE_EXHAUSTED) on
  the small pool instead of queueing without bound.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from runsvc import deadline, logs
from runsvc.api.auth import (
    OPEN_SERVICES,
    RPC_RATE_CLASSES,
    RPC_ROLES,
    SERVICE,
    Gate,
    bind_principal,
    undecodable,
)
from runsvc.api.open_streams import OpenStreams
from runsvc.metrics.grpc_server import GrpcMetrics, MethodMeter

REQUEST_ID_HEADER = "x-request-id"
_SANE = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
BUSY_MESSAGE = "the server is busy; try again shortly"
# Calls of ours that wait in line rather than being shed (see the module docstring).
NEVER_SHED = frozenset({f"/{SERVICE}/Heartbeat"})


def request_id_and_token(metadata: Any) -> tuple[str, str | None]:
    """The caller's request id if it is a sane token (else one made when the call first
    logs: :data:`runsvc.logs.FRESH_REQUEST_ID`), and its bearer token."""
    rid = token = None
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and _SANE.fullmatch(value):
            rid = value
        elif key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            token = value[len("Bearer ") :].strip()
    return rid or logs.FRESH_REQUEST_ID, token


class CountingPool(futures.ThreadPoolExecutor):
    """A thread pool that knows how many calls it holds, running or queued."""

    def __init__(self, max_workers: int, thread_name_prefix: str) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._held = 0
        self._count_lock = threading.Lock()

    @property
    def held(self) -> int:
        return self._held

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        with self._count_lock:
            self._held += 1
        try:
            future = super().submit(fn, *args, **kwargs)
        except BaseException:
            self._release()
            raise
        future.add_done_callback(self._release)
        return future

    def _release(self, _future: object = None) -> None:
        with self._count_lock:
            self._held -= 1


class Edge(grpc.ServerInterceptor):  # type: ignore[misc]
    """See the module docstring. ``gate`` None: a server of open services only."""

    def __init__(
        self,
        gate: Gate | None,
        *,
        metrics: GrpcMetrics | None,
        open_streams: OpenStreams,
        main_pool: CountingPool | None = None,
        max_in_flight: int | None = None,
        heartbeat_pool: futures.ThreadPoolExecutor | None = None,
        probe_pool: futures.ThreadPoolExecutor | None = None,
    ) -> None:
        self._gate = gate
        self._metrics = metrics
        self._open_streams = open_streams
        self._main_pool = main_pool
        self._max_in_flight = max_in_flight
        self._heartbeat_pool = heartbeat_pool
        self._probe_pool = probe_pool
        # Each method served: its handler, and whether it may be shed when busy.
        self._handlers: dict[str, tuple[grpc.RpcMethodHandler, bool]] = {}
        self._shed = self._on(probe_pool, grpc.unary_unary_rpc_method_handler(_shed))

    def intercept_service(
        self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        method = details.method
        entry = self._handlers.get(method)
        if entry is None:
            inner = continuation(details)
            built = self._build(method, inner) if inner is not None else None
            if built is None:
                return None  # UNIMPLEMENTED; never an entry a client could choose
            entry = self._handlers[method] = built
        handler, sheddable = entry
        if sheddable and self._busy():
            return self._shed
        return handler

    def _busy(self) -> bool:
        return (
            self._main_pool is not None
            and self._max_in_flight is not None
            and self._main_pool.held >= self._max_in_flight
        )

    # --- building a method's handler, once --------------------------------

    def _build(
        self, method: str, inner: grpc.RpcMethodHandler
    ) -> tuple[grpc.RpcMethodHandler, bool] | None:
        service, _, name = method.lstrip("/").partition("/")
        if service in OPEN_SERVICES:
            return self._open(method, service, name, inner), False
        if inner.unary_unary is None or self._gate is None:
            return None  # every RPC of ours is unary: refuse anything else
        if method in NEVER_SHED:
            return self._on(self._heartbeat_pool, self._gated(method, service, name, inner)), False
        return self._gated(method, service, name, inner), True

    def _meter(self, kind: str, service: str, name: str) -> MethodMeter | None:
        return self._metrics.meter(kind, service, name) if self._metrics else None

    def _gated(
        self, method: str, service: str, name: str, handler: grpc.RpcMethodHandler
    ) -> grpc.RpcMethodHandler:
        gate = self._gate
        assert gate is not None
        allowed = RPC_ROLES.get(name) if service == SERVICE else None
        rate_class = RPC_RATE_CLASSES.get(name, "read")
        inner = handler.unary_unary
        decode = handler.request_deserializer
        meter = self._meter("unary", service, name)

        def behaviour(raw: bytes, context: grpc.ServicerContext) -> Any:
            rid, token = request_id_and_token(context.invocation_metadata())
            with logs.bound(request_id=rid, rpc=method), _metered(meter, context):
                principal = gate.admit(token, method, allowed, rate_class, context)
                try:
                    request = decode(raw) if decode is not None else raw
                except Exception:
                    context.abort_with_status(undecodable("request"))
                    raise  # pragma: no cover - abort raises
                with bind_principal(principal), deadline.bound(gate.deadline(context)):
                    return inner(request, context)

        # The bytes are decoded in ``behaviour``, after the caller was authenticated.
        return grpc.unary_unary_rpc_method_handler(
            behaviour, request_deserializer=None, response_serializer=handler.response_serializer
        )

    def _open(
        self, method: str, service: str, name: str, handler: grpc.RpcMethodHandler
    ) -> grpc.RpcMethodHandler:
        """Health and reflection: no token; their streams admitted a few at a time."""
        streaming = handler.response_streaming
        kind = _kind(handler)
        meter = self._meter(kind, service, name)
        inner = (
            handler.unary_unary
            or handler.unary_stream
            or handler.stream_unary
            or handler.stream_stream
        )
        admit = self._open_streams.admit

        if streaming:

            def streamed(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                with _metered(meter, context), admit(context):
                    yield from inner(request, context)

            behaviour: Callable[..., Any] = streamed
        else:

            def single(request: Any, context: grpc.ServicerContext) -> Any:
                with _metered(meter, context):
                    return inner(request, context)

            behaviour = single
        make = {
            "unary": grpc.unary_unary_rpc_method_handler,
            "client_stream": grpc.stream_unary_rpc_method_handler,
            "server_stream": grpc.unary_stream_rpc_method_handler,
            "bidi_stream": grpc.stream_stream_rpc_method_handler,
        }[kind]
        wrapped = make(
            behaviour,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        # Streams stay on the main pool (they are few and bounded); a unary probe
        # gets the small pool, so it never waits behind busy RPC threads.
        return wrapped if streaming else self._on(self._probe_pool, wrapped)

    @staticmethod
    def _on(
        pool: futures.ThreadPoolExecutor | None, handler: grpc.RpcMethodHandler
    ) -> grpc.RpcMethodHandler:
        """``handler`` run on ``pool`` (gRPC's per-method thread pool) when one is given."""
        if pool is not None:
            behaviour = handler.unary_unary or handler.unary_stream
            behaviour.experimental_thread_pool = pool
        return handler


class _metered:
    """Counts a call in the gRPC metrics (go-grpc-prometheus names) around its work."""

    __slots__ = ("_context", "_meter", "_start")

    def __init__(self, meter: MethodMeter | None, context: grpc.ServicerContext) -> None:
        self._meter = meter
        self._context = context

    def __enter__(self) -> None:
        if self._meter is not None:
            self._meter.started.inc()
            self._start = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, *_rest: object) -> None:
        if self._meter is None:
            return
        code = self._context.code()
        if kind is not None and code is None:
            # abort() sets the code before it raises; a stream the client
            # abandoned ends with GeneratorExit and no code.
            active = self._context.is_active()
            code = grpc.StatusCode.UNKNOWN if active else grpc.StatusCode.CANCELLED
        self._meter.done(time.perf_counter() - self._start, code)


def _kind(handler: grpc.RpcMethodHandler) -> str:
    """go-grpc-prometheus's names for the four kinds of method."""
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


def _shed(_request: Any, context: grpc.ServicerContext) -> Any:
    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, BUSY_MESSAGE)
