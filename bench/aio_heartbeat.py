"""The heartbeat path on ``grpc.aio``, measured by ``make bench`` beside the sync server.

``python -m bench.aio_heartbeat --port P`` (settings from the environment, like
``runsvc serve``) serves ``RunService/Heartbeat`` and health ``Check`` on one event loop.
A heartbeat does what the sync edge does for it (request id and token from the metadata,
gRPC metrics, the same ``Gate``: token, rate limit and role; tenant scope, validation), then queues
its touch with the same group commit (``Heartbeats.submit``) and awaits a future that the
flusher thread resolves: no thread waits per call. Database work stays on the flusher's
thread. It answers the question the sync design leaves open: what does the event loop buy
on the hot path, measured on the same machine in the same run.

A benchmark tool, not a server to deploy: every other RPC is unimplemented here.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from prometheus_client import CollectorRegistry

from runsvc import logs, settings, tokens
from runsvc.api.auth import (
    RPC_RATE_CLASSES,
    RPC_ROLES,
    SERVICE,
    Gate,
    caller_of,
    tenant_scope,
)
from runsvc.api.convert import timestamp
from runsvc.api.edge import request_id_and_token
from runsvc.metrics.grpc_server import GrpcMetrics
from runsvc.ratelimit import RateLimiter
from runsvc.server import build
from runsvc.store import runs as run_store
from runsvc.validation import Checker
from runsvc_client.v1 import run_service_pb2 as pb
from runsvc_client.v1 import run_service_pb2_grpc as pb_grpc

METHOD = f"/{SERVICE}/Heartbeat"


class _Refused(Exception):
    """The gate refused the call: the arguments for the aio context's ``abort``."""


class _Refusing:
    """An aio context as the sync gate sees it: its refusals raise instead of aborting (an
    aio context's ``abort`` is a coroutine), everything else is the context's own."""

    def __init__(self, context: Any) -> None:
        self._context = context

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Refused(code, details)

    def abort_with_status(self, status: grpc.Status) -> None:
        raise _Refused(status.code, status.details, status.trailing_metadata)


class AioHeartbeats(pb_grpc.RunServiceServicer):  # type: ignore[misc]
    def __init__(self, config: settings.Settings, secret: str) -> None:
        self._components = build(config, secret=secret)
        self._service = self._components.service
        # The sync edge's own gate: the same token check, rate limit and role.
        self._gate = Gate(tokens.Verifier(secret=secret), limiter=RateLimiter(config.rate_limits))
        self._meter = GrpcMetrics(CollectorRegistry()).meter("unary", SERVICE, "Heartbeat")
        self._allowed = RPC_ROLES["Heartbeat"]
        self._rate_class = RPC_RATE_CLASSES["Heartbeat"]

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Any) -> pb.HeartbeatResponse:
        rid, token = request_id_and_token(context.invocation_metadata())
        self._meter.started.inc()
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            with logs.bound(request_id=rid, rpc=METHOD):
                return await self._beat(request, context, token)
        except BaseException:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        finally:
            self._meter.done(time.perf_counter() - start, code)

    async def _beat(
        self, request: pb.HeartbeatRequest, context: Any, token: str | None
    ) -> pb.HeartbeatResponse:
        try:
            principal = self._gate.admit(
                token, METHOD, self._allowed, self._rate_class, _Refusing(context)
            )
        except _Refused as refused:
            await context.abort(*refused.args)
        check = Checker()
        check.object_id("run_id", request.run_id)
        check.lease_epoch("lease_epoch", request.lease_epoch)
        check.done()
        caller = caller_of(principal)
        touch = run_store.LeaseTouch(
            request.run_id,
            tenant_scope(principal, ""),
            request.lease_epoch,
            worker=caller.worker,
        )
        loop = asyncio.get_running_loop()
        answered = loop.create_future()
        heartbeats = self._service.heartbeats
        waiting = heartbeats.submit(
            touch, lambda: loop.call_soon_threadsafe(answered.set_result, None)
        )
        await answered
        if waiting.beat is None:
            # Refused or failed: the reason is read from the database, off the loop.
            beat = await asyncio.to_thread(heartbeats.outcome, waiting, caller=caller)
        else:
            beat = heartbeats.outcome(waiting, caller=caller)
        self._service.context.observer.heartbeat()
        stale_time = self._service.context.policy.stale_time(beat.now)
        return pb.HeartbeatResponse(
            cancel_requested=beat.touched.cancel_requested, stale_time=timestamp(stale_time)
        )

    def close(self) -> None:
        self._service.close()
        self._components.db.dispose()


async def serve(port: int) -> None:
    config = settings.load()
    secret = config.jwt_secret
    if secret is None:
        raise SystemExit("RUNSVC_JWT_SECRET is required")
    servicer = AioHeartbeats(config, secret)
    server = grpc.aio.server(
        options=[("grpc.max_concurrent_streams", config.grpc_max_concurrent_streams)]
    )
    pb_grpc.add_RunServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    await stopped.wait()
    await server.stop(grace=1)
    servicer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
