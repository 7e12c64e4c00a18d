"""The composition root: the only place that wires settings, store, service and gRPC.

Nothing imports this module but the command line and tests.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from runsvc import shutdown, tokens
from runsvc.api.auth import RPC_ROLES, SERVICE, Gate
from runsvc.api.edge import CountingPool, Edge
from runsvc.api.open_streams import OpenStreams
from runsvc.api.servicer import RunServiceServicer
from runsvc.clock import Clock
from runsvc.metrics.exporter import Exporter
from runsvc.metrics.store_collector import no_slot_backlog
from runsvc.metrics.wiring import Metrics, build_metrics
from runsvc.ratelimit import RateLimiter
from runsvc.reaper import Reaper
from runsvc.redisslots import sync as slot_sync
from runsvc.service import RunService
from runsvc.service.acquire import TakeReserved
from runsvc.service.paging import derive_key
from runsvc.service.security import SecurityAudit
from runsvc.settings import Settings
from runsvc.slots import Slots, StoreSlots
from runsvc.store import migrate
from runsvc.store.clock import DatabaseClock
from runsvc.store.engine import Database, make_engine
from runsvc_client.v1 import run_service_pb2 as pb
from runsvc_client.v1 import run_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_SEND_BYTES = 4 * 1024 * 1024
# The health port's own threads, and the main port's for probes: a few are plenty.
HEALTH_THREADS = 4
# Probes and shed answers in flight at once on the main port, beyond the other calls.
PROBES_IN_FLIGHT = 64


def jwt_secret(settings: Settings, *, create: bool = False) -> str:
    """The configured secret, else the one kept in the data folder.

    Only ``serve`` creates it (``create``): a command run from the wrong folder
    must say so, not leave a new secret there that no server knows.
    """
    if settings.jwt_secret:
        return settings.jwt_secret
    if create and settings.jwt_secret_path is None:
        return tokens.load_or_create_secret(settings.jwt_secret_file)
    return tokens.read_secret(settings.jwt_secret_file)


def token_verifier(settings: Settings, secret: str | None) -> tokens.Verifier:
    """The token checks the settings ask for (docs/security.md)."""
    keys = None
    if settings.jwt_public_key_file:
        keys = tokens.KeyFile(settings.jwt_public_key_file, tokens.load_pem_keys).keys
    elif settings.jwt_jwks_file:
        keys = tokens.KeyFile(settings.jwt_jwks_file, tokens.load_jwks).keys
    return tokens.Verifier(
        algorithms=settings.jwt_algorithms,
        secret=secret if "HS256" in settings.jwt_algorithms else None,
        public_keys=keys,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        leeway=settings.jwt_leeway_seconds,
        max_lifetime=settings.jwt_max_lifetime_seconds,
    )


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS when a certificate is configured; mutual TLS when a client CA is too."""
    if not (settings.tls_cert_file and settings.tls_key_file):
        return None
    client_ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


@dataclass
class Components:
    settings: Settings
    db: Database
    service: RunService
    reaper: Reaper
    metrics: Metrics | None = None
    # The Redis slot backend's relay, reconciler and figures; None on store-backed slots.
    slot_sync: slot_sync.SlotSync | None = None


def redis_slot_config(settings: Settings) -> slot_sync.RedisSlotConfig | None:
    if not settings.redis_url:
        return None
    return slot_sync.RedisSlotConfig(
        url=settings.redis_url,
        key_prefix=settings.redis_key_prefix,
        timeout_seconds=settings.redis_timeout_seconds,
        ttl_seconds=settings.slot_ttl_seconds,
        orphan_grace_seconds=settings.slot_orphan_grace_seconds,
        reconcile_interval_seconds=settings.slot_reconcile_interval_seconds,
        relay_interval_seconds=settings.slot_relay_interval_seconds,
        relay_max_backoff_seconds=settings.slot_relay_max_backoff_seconds,
    )


def build(
    settings: Settings,
    *,
    clock: Clock | None = None,
    secret: str | None = None,
    store_gauges: bool = True,
) -> Components:
    """Everything but the gRPC edge. ``secret``: the signing secret, which the page-token
    key of every replica sharing it derives from (without it, a key of this process's own).
    ``store_gauges``: whether this process's /metrics reads the store (one process per host)."""
    db = Database(
        make_engine(
            settings.effective_database_url,
            max_connections=settings.database_max_connections or 2 * settings.grpc_max_workers,
        )
    )
    clock = clock or DatabaseClock()
    config = redis_slot_config(settings)
    sync = slot_sync.build(db, clock, settings.slot_limits(), config) if config else None
    slots: Slots = sync.slots if sync else StoreSlots(settings.slot_limits())
    metrics = build_metrics(
        db=db,
        clock=clock,
        policy=settings.liveness(),
        reap_interval_seconds=settings.reap_interval_seconds,
        tenant_series_limit=settings.metrics_tenant_series,
        slot_backlog=sync.backlog if sync else no_slot_backlog,
        store_gauges=store_gauges,
    )
    if sync is not None:
        sync.observe(metrics.observer)
    service = RunService(
        db=db,
        clock=clock,
        slots=slots,
        policy=settings.liveness(),
        observer=metrics.observer,
        group_commit=settings.group_commit(),
        taking=TakeReserved(sync.slots) if sync else None,
        page_key=derive_key(secret) if secret else None,
    )
    return Components(
        settings, db, service, Reaper(service.context), metrics=metrics, slot_sync=sync
    )


def _ignore_denial(_kind: str) -> None:
    pass


class Server:
    """A running gRPC server with its health service and reaper thread."""

    def __init__(
        self,
        components: Components,
        *,
        secret: str | None = None,
        share_port: bool = False,
        startup_cleanup: bool = True,
    ) -> None:
        self.components = components
        self._startup_cleanup = startup_cleanup
        settings = components.settings
        self.audit = SecurityAudit(
            components.service.context, window_seconds=settings.audit_aggregate_seconds
        )
        metrics = components.metrics
        gate = Gate(
            token_verifier(settings, secret),
            audit=self.audit,
            limiter=RateLimiter(settings.rate_limits),
            max_deadline_seconds=settings.grpc_max_deadline_seconds,
            on_denied=metrics.observer.denied if metrics is not None else _ignore_denial,
        )
        if metrics is not None:
            metrics.grpc.preregister(SERVICE, RPC_ROLES)
        self._pool = CountingPool(settings.grpc_max_workers, "rpc")
        # Heartbeats wait together for a group commit: a pool of their own lets a
        # batch gather while the main pool serves everything else.
        self._heartbeat_pool = futures.ThreadPoolExecutor(
            max_workers=settings.grpc_heartbeat_workers, thread_name_prefix="heartbeat"
        )
        self._probe_pool = futures.ThreadPoolExecutor(
            max_workers=HEALTH_THREADS, thread_name_prefix="probe"
        )
        edge = Edge(
            gate,
            metrics=metrics.grpc if metrics is not None else None,
            open_streams=self._open_streams(settings),
            main_pool=self._pool,
            max_in_flight=settings.grpc_max_concurrent_rpcs,
            heartbeat_pool=self._heartbeat_pool,
            probe_pool=self._probe_pool,
        )
        self._grpc = grpc.server(
            self._pool,
            interceptors=[edge],
            options=[
                ("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
                ("grpc.max_send_message_length", MAX_SEND_BYTES),
                ("grpc.max_metadata_size", settings.grpc_max_metadata_bytes),
                ("grpc.max_concurrent_streams", settings.grpc_max_concurrent_streams),
                # Explicit either way: the processes of `serve --workers N` listen on one
                # port together; a lone server refuses a port that another process holds.
                ("grpc.so_reuseport", 1 if share_port else 0),
                (
                    "grpc.max_connection_age_ms",
                    int(settings.grpc_max_connection_age_seconds * 1000),
                ),
                # The calls in flight on an aged connection may take their full deadline.
                (
                    "grpc.max_connection_age_grace_ms",
                    int(settings.grpc_max_deadline_seconds * 1000),
                ),
            ],
            # The edge sheds other calls beyond RUNSVC_GRPC_MAX_CONCURRENT_RPCS; this
            # hard bound leaves room for the heartbeats it queues instead, and probes.
            maximum_concurrent_rpcs=(
                settings.grpc_max_concurrent_rpcs + settings.heartbeat_queue_max + PROBES_IN_FLIGHT
            ),
        )
        pb_grpc.add_RunServiceServicer_to_server(
            RunServiceServicer(components.service, audit=self.audit), self._grpc
        )
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        if settings.grpc_reflection:
            reflection.enable_server_reflection(
                (pb.DESCRIPTOR.services_by_name["RunService"].full_name, reflection.SERVICE_NAME),
                self._grpc,
            )
        self._health_server, self.health_port = self._health_only(settings, share_port)
        credentials = server_credentials(settings)
        if credentials is None:
            self.port = self._grpc.add_insecure_port(settings.grpc_address)
        else:
            self.port = self._grpc.add_secure_port(settings.grpc_address, credentials)
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {settings.grpc_address}")
        self.exporter = (
            Exporter(metrics.registry, settings.metrics_address)
            if metrics is not None and settings.metrics_address
            else None
        )
        self._stop_reaper = threading.Event()
        self._reaper_thread = threading.Thread(
            target=components.reaper.run_forever,
            args=(self._stop_reaper,),
            kwargs={"interval": settings.reap_interval_seconds},
            name="reaper",
            daemon=True,
        )

    @staticmethod
    def _open_streams(settings: Settings) -> OpenStreams:
        return OpenStreams(
            limit=settings.grpc_open_streams, lifetime_seconds=settings.grpc_open_stream_seconds
        )

    def _health_only(
        self, settings: Settings, share_port: bool
    ) -> tuple[grpc.Server | None, int | None]:
        """The health port: the same health service on threads of its own, plaintext.

        A replica whose RPC threads are all busy still answers its probes here,
        so a liveness probe tells a dead replica from a saturated one; kubelet's
        gRPC probes cannot speak TLS, so this port never does.
        """
        if settings.health_address is None:
            return None, None
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=HEALTH_THREADS, thread_name_prefix="health"),
            interceptors=[Edge(None, metrics=None, open_streams=self._open_streams(settings))],
            options=[
                ("grpc.so_reuseport", 1 if share_port else 0),
                ("grpc.max_receive_message_length", 1024),
                ("grpc.max_connection_age_ms", int(settings.grpc_open_stream_seconds * 1000)),
            ],
            maximum_concurrent_rpcs=HEALTH_THREADS * 4,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        port = server.add_insecure_port(settings.health_address)
        if port == 0:
            raise RuntimeError(f"cannot listen on {settings.health_address}")
        return server, port

    @property
    def calls_held(self) -> int:
        """Calls running or queued on the RPC threads (what sheds new ones when busy)."""
        return self._pool.held

    def start(self) -> None:
        if self._startup_cleanup:
            report = self.components.reaper.startup_pass()
            log.info("startup cleanup done", extra={"ended": report.ended})
        if self.exporter is not None:
            self.exporter.start()
            log.info("serving metrics", extra={"metrics_port": self.exporter.port})
        if self.components.slot_sync is not None:
            self.components.slot_sync.start()
        self._grpc.start()
        if self._health_server is not None:
            self._health_server.start()
            log.info("serving health", extra={"health_port": self.health_port})
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
        if self._health_server is not None:
            self._health_server.stop(0).wait()
        for pool in (self._heartbeat_pool, self._probe_pool):
            pool.shutdown(wait=False, cancel_futures=True)
        self.audit.flush()
        self.components.service.close()
        if self._reaper_thread.is_alive():
            self._reaper_thread.join(timeout=grace + 5)
        if self.exporter is not None:
            self.exporter.stop()
        if self.components.slot_sync is not None:
            self.components.slot_sync.stop()
        self.components.db.dispose()
        log.info("stopped")

    def wait(self) -> None:
        self._grpc.wait_for_termination()


def serve(settings: Settings, *, replica: Replica | None = None) -> int:
    """Serve until SIGTERM or SIGINT, then stop gracefully.

    ``replica``: this process is one of ``serve --workers N`` (runsvc/supervisor.py).
    """
    url = settings.effective_database_url
    if url.startswith("sqlite"):
        # The embedded default needs no separate step: bring its schema up to date.
        migrate.upgrade(url)
    new_secret = not settings.jwt_secret and not settings.jwt_secret_file.exists()
    secret = jwt_secret(settings, create=True) if "HS256" in settings.jwt_algorithms else None
    if secret and not settings.jwt_secret:
        log.info(
            "using the signing secret kept in a file",
            extra={"path": str(settings.jwt_secret_file), "new": new_secret},
        )
    server = Server(
        # Of `serve --workers N`, the first process alone reads the store for /metrics.
        build(settings, secret=secret, store_gauges=replica is None or replica.index == 0),
        secret=secret,
        share_port=replica is not None,
        startup_cleanup=replica is None or replica.startup_cleanup,
    )
    stopping = shutdown.stop_on_signals()
    server.start()
    if replica is not None:
        replica.report_ready()
    elif url.startswith("sqlite") and secret and not settings.jwt_secret:
        print(welcome(settings, server.port, new_secret=new_secret), file=sys.stderr, flush=True)
    stopping.wait()
    server.stop()
    return 0


def welcome(settings: Settings, port: int, *, new_secret: bool) -> str:
    """What someone who just typed `make run` needs: where things are, what to type next."""
    command = sys.argv[0] if sys.argv[0].endswith("runsvc") else "runsvc"
    host = settings.grpc_address.rpartition(":")[0]
    return "\n".join(
        [
            f"runsvc is serving on {host}:{port} (Ctrl-C stops it)",
            f"  data:           {settings.data_dir} (the embedded SQLite database)",
            f"  signing secret: {settings.jwt_secret_file}"
            + (" (new: made just now, mode 0600)" if new_secret else " (kept from before)"),
            "next, in another shell:",
            f"  export RUNSVC_TOKEN=$({command} token --role backend --tenant acme)",
            f"  {command} runs create --jobs 100",
            f"  {command} runs active",
        ]
    )


@dataclass(frozen=True)
class Replica:
    """How the supervisor of ``serve --workers N`` started this process."""

    index: int
    # The write end of a pipe: one byte once serving, so the supervisor tells a
    # process that failed at start from one that served and then died.
    ready_fd: int | None = None
    # Only the first process cleans up at start: the others would scan the same rows.
    startup_cleanup: bool = True

    def report_ready(self) -> None:
        if self.ready_fd is None:
            return
        try:
            os.write(self.ready_fd, b"1")
            os.close(self.ready_fd)
        except OSError:  # the supervisor is gone; serving goes on until a signal
            log.warning("could not tell the supervisor this process is serving")
