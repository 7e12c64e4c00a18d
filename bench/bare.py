"""The reference server of ``make bench``: ``python -m bench.bare --port P``.

A bare synchronous gRPC server, the same thread count as runsvc's default
pool, with one handler that answers ``grpc.health.v1.Health/Check`` with a
response serialized once at start: no interceptors, no deserialization, no
logging, no database. It is the most a Python gRPC server does on this machine,
so every runsvc path is reported as a ratio to it, measured in the same run.
"""

from __future__ import annotations

import argparse
import signal
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health_pb2

CHECK = "/grpc.health.v1.Health/Check"
SERVING = health_pb2.HealthCheckResponse(
    status=health_pb2.HealthCheckResponse.SERVING
).SerializeToString()


def _answer(_request: bytes, _context: grpc.ServicerContext) -> bytes:
    return SERVING


class _OnlyCheck(grpc.GenericRpcHandler):
    def __init__(self) -> None:
        # Raw bytes in and out: the handler itself costs next to nothing.
        self._handler = grpc.unary_unary_rpc_method_handler(_answer)

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self._handler if details.method == CHECK else None


def serve(port: int, threads: int) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads))
    server.add_generic_rpc_handlers((_OnlyCheck(),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    stopped.wait()
    server.stop(grace=1).wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=32)
    args = parser.parse_args()
    serve(args.port, args.threads)


if __name__ == "__main__":
    main()
