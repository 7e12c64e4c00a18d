"""gRPC server metrics under the names Go services use (go-grpc-prometheus).

``grpc_server_started_total`` and ``grpc_server_handled_total`` with labels
``grpc_type`` (unary, client_stream, server_stream, bidi_stream),
``grpc_service``, ``grpc_method`` and, on handled, ``grpc_code`` spelled as
Go spells it (``OK``, ``InvalidArgument``, ``Canceled``…), and the
``grpc_server_handling_seconds`` histogram with Go's default buckets, so
that dashboards and alerts written for Go services work unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

from runsvc.api.handlers import UNARY, kind, wrap

# prometheus.DefBuckets of the Go client.
GO_DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LABELS = ("grpc_type", "grpc_service", "grpc_method")


def go_code(code: grpc.StatusCode | None) -> str:
    """``INVALID_ARGUMENT`` -> ``InvalidArgument``; Go spells CANCELLED with one L."""
    if code is None:
        return "OK"
    if code is grpc.StatusCode.CANCELLED:
        return "Canceled"
    if code is grpc.StatusCode.OK:
        return "OK"
    return "".join(part.capitalize() for part in code.name.split("_"))


class GrpcMetricsInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, registry: CollectorRegistry) -> None:
        self.started = Counter(
            "grpc_server_started_total",
            "Total number of RPCs started on the server.",
            LABELS,
            registry=registry,
        )
        self.handled = Counter(
            "grpc_server_handled_total",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            (*LABELS, "grpc_code"),
            registry=registry,
        )
        self.seconds = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level "
            "handled by the server.",
            LABELS,
            buckets=GO_DEFAULT_BUCKETS,
            registry=registry,
        )

    def preregister(self, service: str, methods: Iterable[str]) -> None:
        """Create the series of unary methods up front, as Go's InitializeMetrics does."""
        for method in methods:
            self.started.labels(UNARY, service, method)
            self.handled.labels(UNARY, service, method, "OK")
            self.seconds.labels(UNARY, service, method)

    def intercept_service(
        self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
        if handler is None:
            # An unknown method: answered UNIMPLEMENTED, and never a label a client can choose.
            return None
        service, _, method = details.method.lstrip("/").partition("/")
        labels = (kind(handler), service, method)

        @contextmanager
        def around(context: grpc.ServicerContext) -> Iterator[None]:
            self.started.labels(*labels).inc()
            start = time.perf_counter()
            try:
                yield
            except BaseException:
                # abort() sets the code before it raises; a stream the client
                # abandoned ends with GeneratorExit and no code.
                lost = grpc.StatusCode.UNKNOWN if context.is_active() else grpc.StatusCode.CANCELLED
                self._done(labels, start, context.code() or lost)
                raise
            self._done(labels, start, context.code())

        return wrap(handler, around)

    def _done(self, labels: tuple[str, str, str], start: float, code: Any) -> None:
        self.seconds.labels(*labels).observe(time.perf_counter() - start)
        self.handled.labels(*labels, go_code(code)).inc()
