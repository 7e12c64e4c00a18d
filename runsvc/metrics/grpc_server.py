"""gRPC server metrics under the names Go services use (go-grpc-prometheus).

``grpc_server_started_total`` and ``grpc_server_handled_total`` with labels
``grpc_type`` (unary, client_stream, server_stream, bidi_stream),
``grpc_service``, ``grpc_method`` and, on handled, ``grpc_code`` spelled as
Go spells it (``OK``, ``InvalidArgument``, ``Canceled``…), and the
``grpc_server_handling_seconds`` histogram with Go's default buckets, so
that dashboards and alerts written for Go services work unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

# prometheus.DefBuckets of the Go client.
GO_DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LABELS = ("grpc_type", "grpc_service", "grpc_method")
UNARY = "unary"


def go_code(code: grpc.StatusCode | None) -> str:
    """``INVALID_ARGUMENT`` -> ``InvalidArgument``; Go spells CANCELLED with one L."""
    if code is None:
        return "OK"
    if code is grpc.StatusCode.CANCELLED:
        return "Canceled"
    if code is grpc.StatusCode.OK:
        return "OK"
    return "".join(part.capitalize() for part in code.name.split("_"))


class MethodMeter:
    """One method's series, resolved once: counting a call costs no label lookup."""

    def __init__(self, metrics: GrpcMetrics, labels: tuple[str, str, str]) -> None:
        self.started = metrics.started.labels(*labels)
        self._seconds = metrics.seconds.labels(*labels)
        self._handled_of = metrics.handled
        self._labels = labels
        self._handled: dict[str, Any] = {}

    def done(self, seconds: float, code: grpc.StatusCode | None) -> None:
        self._seconds.observe(seconds)
        name = go_code(code)
        counter = self._handled.get(name)
        if counter is None:
            counter = self._handled[name] = self._handled_of.labels(*self._labels, name)
        counter.inc()


class GrpcMetrics:
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

    def meter(self, kind: str, service: str, method: str) -> MethodMeter:
        """The series of one method the server serves (never of a name a client chose)."""
        return MethodMeter(self, (kind, service, method))
