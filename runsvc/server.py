"""The composition root: the only place that wires settings, store, service and gRPC.

Nothing imports this module but the command line and tests.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from runsvc import tokens
from runsvc.api.auth import SERVICE, AuthInterceptor
from runsvc.api.servicer import RunServiceServicer
from runsvc.clock import Clock
from runsvc.reaper import Reaper
from runsvc.service import GroupCommit, RunService
from runsvc.settings import Settings
from runsvc.slots import StoreSlots
from runsvc.store import migrate
from runsvc.store.clock import DatabaseClock
from runsvc.store.engine import Database, make_engine
from runsvc_client.v1 import run_service_pb2 as pb
from runsvc_client.v1 import run_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 1024 * 1024


def jwt_secret(settings: Settings) -> str:
    """The configured secret, else the one kept in the data folder (created on first use)."""
    if settings.jwt_secret:
        return settings.jwt_secret
    return tokens.load_or_create_secret(settings.jwt_secret_file)


@dataclass
class Components:
    settings: Settings
    db: Database
    service: RunService
    reaper: Reaper


def build(settings: Settings, *, clock: Clock | None = None) -> Components:
    db = Database(make_engine(settings.effective_database_url, pool_size=settings.grpc_max_workers))
    service = RunService(
        db=db,
        clock=clock or DatabaseClock(),
        slots=StoreSlots(settings.slot_limits()),
        policy=settings.liveness(),
        group_commit=group_commit(settings),
    )
    return Components(settings, db, service, Reaper(service.context))


def group_commit(settings: Settings) -> GroupCommit | None:
    """How heartbeats are batched; None writes each with its own statement."""
    if not settings.heartbeat_group_commit:
        return None
    return GroupCommit(
        max_batch=settings.heartbeat_batch_max,
        max_delay=settings.heartbeat_batch_delay_seconds,
        max_queue=settings.heartbeat_queue_max,
    )


class Server:
    """A running gRPC server with its health service and reaper thread."""

    def __init__(self, components: Components, *, secret: str) -> None:
        self.components = components
        settings = components.settings
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=settings.grpc_max_workers, thread_name_prefix="rpc"
            ),
            interceptors=[AuthInterceptor(secret)],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", 4 * MAX_MESSAGE_BYTES),
            ],
        )
        pb_grpc.add_RunServiceServicer_to_server(RunServiceServicer(components.service), self._grpc)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(
            (pb.DESCRIPTOR.services_by_name["RunService"].full_name, reflection.SERVICE_NAME),
            self._grpc,
        )
        self.port = self._grpc.add_insecure_port(settings.grpc_address)
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {settings.grpc_address}")
        self._stop_reaper = threading.Event()
        self._reaper_thread = threading.Thread(
            target=components.reaper.run_forever,
            args=(self._stop_reaper,),
            kwargs={"interval": settings.reap_interval_seconds},
            name="reaper",
            daemon=True,
        )

    def start(self) -> None:
        report = self.components.reaper.startup_pass()
        log.info("startup cleanup done", extra={"ended": report.ended})
        self._grpc.start()
        self._reaper_thread.start()
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        host = self.components.settings.grpc_address.rpartition(":")[0]
        log.info("serving", extra={"address": f"{host}:{self.port}", "port": self.port})

    def stop(self, grace: float | None = None) -> None:
        """Health goes NOT_SERVING, new calls are refused, in-flight calls finish."""
        self.health.enter_graceful_shutdown()
        self._stop_reaper.set()
        grace = self.components.settings.shutdown_grace_seconds if grace is None else grace
        self._grpc.stop(grace).wait()
        self.components.service.close()
        if self._reaper_thread.is_alive():
            self._reaper_thread.join(timeout=grace + 5)
        self.components.db.dispose()
        log.info("stopped")

    def wait(self) -> None:
        self._grpc.wait_for_termination()


def serve(settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT, then stop gracefully."""
    url = settings.effective_database_url
    if url.startswith("sqlite"):
        # The embedded default needs no separate step: bring its schema up to date.
        migrate.upgrade(url)
    secret = jwt_secret(settings)
    if not settings.jwt_secret:
        log.info(
            "using the signing secret kept in the data folder",
            extra={"path": str(settings.jwt_secret_file.resolve())},
        )
    server = Server(build(settings), secret=secret)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    stopping.wait()
    server.stop()
    return 0
