"""Settings: one object, read once from ``RUNSVC_*`` environment variables.

Each setting is declared once, below, as a field of :class:`Settings` with its
variable, default, parser, group and help; ``load`` reads them and
``tools/gen_settings_doc.py`` writes the reference (docs/settings.md) from the
same declarations. Every value is checked at start, and every problem is
reported in one message naming the variable.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from runsvc.domain import LivenessPolicy
from runsvc.ratelimit import DEFAULT_LIMITS
from runsvc.service.heartbeats import GroupCommit
from runsvc.slots import SlotLimits

T = TypeVar("T")


class SettingsError(ValueError):
    """The environment holds settings runsvc cannot use."""


MAX_SECONDS = 7 * 24 * 3600.0


def _positive_float(raw: str) -> float:
    value = float(raw)
    # math.isfinite first: "inf" and "1e400" parse, and would overflow timedelta later.
    if not math.isfinite(value) or not 0 < value <= MAX_SECONDS:
        raise ValueError(f"must be a number of seconds greater than 0 and at most {MAX_SECONDS:g}")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError("must be a whole number of at least 1")
    return value


def _overrides(raw: str) -> dict[str, int]:
    """``tenant-a=5,tenant-b=20``"""
    result: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        tenant, _, limit = item.partition("=")
        if not tenant or not limit:
            raise ValueError("must look like tenant-a=5,tenant-b=20")
        result[tenant.strip()] = _positive_int(limit.strip())
    return result


def _address(raw: str) -> str:
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be host:port, e.g. 127.0.0.1:50051")
    return raw


def _secret(raw: str) -> str:
    if len(raw.encode()) < 32:
        raise ValueError("must be at least 32 bytes (an HS256 key as long as its hash)")
    return raw


def _redis_url(raw: str) -> str:
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    return raw


def _key_prefix(raw: str) -> str:
    if len(raw) > 64 or any(c.isspace() for c in raw):
        raise ValueError("must be at most 64 characters, without spaces")
    return raw


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value not in {"true", "false", "1", "0", "yes", "no"}:
        raise ValueError("must be true or false")
    return value in {"true", "1", "yes"}


def _short_delay(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value) or not 0 <= value <= 1:
        raise ValueError("must be a number of seconds from 0 to 1")
    return value


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
    return level


RATE_CLASSES = ("read", "write", "worker", "heartbeat")
MAX_GRPC_MESSAGE_BYTES = 4 * 1024 * 1024


def _algorithms(raw: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(part.strip().upper() for part in raw.split(",") if part.strip()))
    allowed = ("HS256", "RS256", "ES256")
    if not names or any(name not in allowed for name in names):
        raise ValueError(f"must be a comma-separated list of {', '.join(allowed)}")
    return names


def _existing_file(raw: str) -> Path:
    path = Path(raw)
    if not path.is_file():
        raise ValueError("no such file")
    return path


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw)
        if not low <= value <= high:
            raise ValueError(f"must be a whole number between {low} and {high}")
        return value

    return parse


def _leeway(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value) or not 0 <= value <= 300:
        raise ValueError("must be a number of seconds between 0 and 300")
    return value


def _rate_limits(raw: str) -> dict[str, tuple[float, float]]:
    """``read=50:100,heartbeat=20:40``: requests per second and burst, per tenant."""
    result: dict[str, tuple[float, float]] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, _, spec = item.partition("=")
        rate, _, burst = spec.partition(":")
        if name.strip() not in RATE_CLASSES or not rate:
            raise ValueError(f"must look like read=50:100 with classes {', '.join(RATE_CLASSES)}")
        per_second = float(rate)
        size = float(burst) if burst else max(per_second, 1.0)
        if not (math.isfinite(per_second) and math.isfinite(size)) or per_second <= 0 or size < 1:
            raise ValueError("a rate must be above 0 per second and a burst at least 1")
        result[name.strip()] = (per_second, size)
    return result


def _optional_address(raw: str) -> str | None:
    if raw.strip().lower() in {"", "off"}:
        return None
    return _address(raw)


MAX_TENANT_SERIES = 1000


def _tenant_series(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= MAX_TENANT_SERIES:
        raise ValueError(f"must be a whole number from 0 (off) to {MAX_TENANT_SERIES}")
    return value


def _share(raw: str) -> float:
    value = float(raw)
    if not 0 < value <= 1:
        raise ValueError("must be a share above 0 and at most 1 (1 turns the breaker off)")
    return value


# The groups of the reference, in its order.
GROUPS = {
    "server": "Server and gRPC",
    "auth": "Tokens and TLS",
    "store": "Store",
    "slots": "Concurrency slots",
    "redis": "Slots in Redis",
    "liveness": "Liveness and the reaper",
    "heartbeats": "Heartbeats",
    "metrics": "Metrics",
}


def setting(
    group: str,
    variable: str,
    default: Any,
    parse: Callable[[str], Any],
    help: str,
    *,
    shown: str | None = None,
    secret: bool = False,
    empty_is_value: bool = False,
) -> Any:
    """One setting: a field of :class:`Settings` that knows its variable, parser and help.

    ``shown`` is the default as the reference writes it, when the value alone would
    mislead (a default computed at start); ``secret`` hides the value in errors;
    ``empty_is_value``: set to nothing means something (off), not "the default".
    """
    assert group in GROUPS, group
    metadata = {
        "group": group,
        "variable": variable,
        "parse": parse,
        "help": help,
        "shown": shown,
        "secret": secret,
        "empty_is_value": empty_is_value,
    }
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


_LIVENESS = LivenessPolicy()
_HEARTBEATS = GroupCommit()


@dataclass(frozen=True)
class Settings:
    # Server and gRPC
    grpc_address: str = setting(
        "server",
        "RUNSVC_GRPC_ADDRESS",
        "127.0.0.1:50051",
        _address,
        "where to listen (port 0: any free port)",
    )
    grpc_max_workers: int = setting(
        "server", "RUNSVC_GRPC_MAX_WORKERS", 32, _positive_int, "server threads"
    )
    grpc_max_message_bytes: int = setting(
        "server",
        "RUNSVC_GRPC_MAX_MESSAGE_BYTES",
        1024 * 1024,
        _bounded_int(1024, MAX_GRPC_MESSAGE_BYTES),
        "largest request accepted (at most 4 MiB)",
    )
    grpc_max_metadata_bytes: int = setting(
        "server",
        "RUNSVC_GRPC_MAX_METADATA_BYTES",
        16 * 1024,
        _bounded_int(1024, 64 * 1024),
        "largest request metadata (headers) accepted",
    )
    # Above the calls in flight a server takes, so that a busy connection's calls
    # meet the server's own limits (heartbeats queued, others shed), never a refused
    # stream (a client does not queue those: they fail UNAVAILABLE).
    grpc_max_concurrent_streams: int = setting(
        "server",
        "RUNSVC_GRPC_MAX_CONCURRENT_STREAMS",
        1000,
        _bounded_int(1, 10_000),
        "concurrent calls per connection (beyond, the stream is refused: keep it above the "
        "calls one client has in flight)",
    )
    grpc_max_concurrent_rpcs: int = setting(
        "server",
        "RUNSVC_GRPC_MAX_CONCURRENT_RPCS",
        256,
        _bounded_int(1, 10_000),
        "calls running or queued on the RPC threads; beyond, others get `RESOURCE_EXHAUSTED` "
        "at once, while heartbeats queue (up to `RUNSVC_HEARTBEAT_QUEUE_MAX`) and health "
        "checks have threads of their own",
    )
    grpc_heartbeat_workers: int = setting(
        "server",
        "RUNSVC_GRPC_HEARTBEAT_WORKERS",
        64,
        _bounded_int(1, 1024),
        "threads serving Heartbeat, apart from the RPC threads: each waits for its group "
        "commit, so more of them make larger batches",
    )
    grpc_max_deadline_seconds: float = setting(
        "server",
        "RUNSVC_GRPC_MAX_DEADLINE_SECONDS",
        30.0,
        _positive_float,
        "cap on a call's deadline (bounds every PostgreSQL statement of the call)",
    )
    # A connection is closed gracefully (GOAWAY) after this long, so that clients
    # balancing over a DNS name resolve it again and reach replicas added since.
    grpc_max_connection_age_seconds: float = setting(
        "server",
        "RUNSVC_GRPC_MAX_CONNECTION_AGE_SECONDS",
        300.0,
        _positive_float,
        "a connection is closed gracefully (GOAWAY, its calls may finish) after this long, "
        "so clients balancing over a DNS name re-resolve it and reach new replicas",
    )
    # The open services: reflection only when asked for; their streams (health
    # Watch, reflection) a few at once, each for a bounded time.
    grpc_reflection: bool = setting(
        "server",
        "RUNSVC_GRPC_REFLECTION",
        False,
        _flag,
        "serve gRPC reflection (for `grpcurl` and the like); off unless asked for, "
        "as it answers without a token",
    )
    grpc_open_streams: int = setting(
        "server",
        "RUNSVC_GRPC_OPEN_STREAMS",
        4,
        _bounded_int(1, 64),
        "streams of the tokenless services (health `Watch`, reflection) at once per process; "
        "more are refused `RESOURCE_EXHAUSTED` at once",
    )
    grpc_open_stream_seconds: float = setting(
        "server",
        "RUNSVC_GRPC_OPEN_STREAM_SECONDS",
        60.0,
        _positive_float,
        "each such stream is cancelled after this long (a health watcher reconnects)",
    )
    # A plaintext port that serves only gRPC health, on threads of its own, for
    # probes that must tell a dead replica from a busy one (None: none).
    health_address: str | None = setting(
        "server",
        "RUNSVC_HEALTH_ADDRESS",
        None,
        _optional_address,
        "a plaintext port serving only gRPC health, on threads of its own: probes there "
        "tell a dead replica from a busy one, and work when the main port speaks TLS",
    )
    rate_limits: Mapping[str, tuple[float, float]] = setting(
        "server",
        "RUNSVC_RATE_LIMITS",
        {},
        _rate_limits,
        "per-tenant token buckets, `class=per_second:burst`; name only the classes to change",
        shown=",".join(f"{k}={r:g}:{b:g}" for k, (r, b) in DEFAULT_LIMITS.items()),
    )
    shutdown_grace_seconds: float = setting(
        "server",
        "RUNSVC_SHUTDOWN_GRACE_SECONDS",
        10.0,
        _positive_float,
        "how long in-flight calls may finish on stop",
    )
    log_level: str = setting(
        "server",
        "RUNSVC_LOG_LEVEL",
        "INFO",
        _log_level,
        "logs are one JSON object per line on stderr",
    )
    # Tokens and TLS
    jwt_secret: str | None = setting(
        "auth",
        "RUNSVC_JWT_SECRET",
        None,
        _secret,
        "HS256 signing secret; unset: `serve` creates `$RUNSVC_DATA_DIR/jwt-secret` (mode 0600) "
        "and logs where, and `token` uses the same one",
        secret=True,
    )
    # A file holding the HS256 secret (a mounted Secret); unset: $RUNSVC_DATA_DIR/jwt-secret.
    jwt_secret_path: Path | None = setting(
        "auth",
        "RUNSVC_JWT_SECRET_FILE",
        None,
        _existing_file,
        "a file holding the HS256 secret instead (a mounted Secret): a regular file, not a "
        "link, of this user or root, that others can neither read nor change",
    )
    jwt_algorithms: tuple[str, ...] = setting(
        "auth",
        "RUNSVC_JWT_ALGORITHMS",
        ("HS256",),
        _algorithms,
        "allowed token algorithms, among `HS256`, `RS256`, `ES256` (`none` never)",
    )
    jwt_public_key_file: Path | None = setting(
        "auth",
        "RUNSVC_JWT_PUBLIC_KEY_FILE",
        None,
        _existing_file,
        "PEM file of one or more RSA/EC public keys for RS256/ES256 (re-read when it changes)",
    )
    jwt_jwks_file: Path | None = setting(
        "auth",
        "RUNSVC_JWT_JWKS_FILE",
        None,
        _existing_file,
        "or a JWKS file (keys chosen by `kid`; re-read when it changes)",
    )
    jwt_issuer: str | None = setting(
        "auth",
        "RUNSVC_JWT_ISSUER",
        None,
        str,
        "when set, tokens must carry this `iss` (`runsvc token` adds it)",
    )
    jwt_audience: str | None = setting(
        "auth",
        "RUNSVC_JWT_AUDIENCE",
        None,
        str,
        "when set, tokens must carry this `aud`; unset, a token with any `aud` is refused",
    )
    jwt_leeway_seconds: float = setting(
        "auth",
        "RUNSVC_JWT_LEEWAY_SECONDS",
        5.0,
        _leeway,
        "clock leeway for `exp` and `nbf` (`iat` is not judged)",
    )
    jwt_max_lifetime_seconds: float = setting(
        "auth",
        "RUNSVC_JWT_MAX_LIFETIME_SECONDS",
        86400.0,
        _positive_float,
        "a token living longer than this from its `iat` (or from now, without one) is refused; "
        "`runsvc token --ttl` refuses more",
    )
    tls_cert_file: Path | None = setting(
        "auth",
        "RUNSVC_TLS_CERT_FILE",
        None,
        _existing_file,
        "serve gRPC over TLS with this certificate chain (with `RUNSVC_TLS_KEY_FILE`)",
    )
    tls_key_file: Path | None = setting(
        "auth",
        "RUNSVC_TLS_KEY_FILE",
        None,
        _existing_file,
        "the private key of `RUNSVC_TLS_CERT_FILE`",
    )
    tls_client_ca_file: Path | None = setting(
        "auth",
        "RUNSVC_TLS_CLIENT_CA_FILE",
        None,
        _existing_file,
        "mutual TLS: every client needs a certificate from this CA",
    )
    audit_aggregate_seconds: float = setting(
        "auth",
        "RUNSVC_AUDIT_AGGREGATE_SECONDS",
        60.0,
        _positive_float,
        "refused tokens and throttled calls are written as one counted audit row per window",
    )
    # Store
    data_dir: Path = setting(
        "store",
        "RUNSVC_DATA_DIR",
        Path("data"),
        Path,
        "folder of the embedded database and the generated signing secret (made absolute at start)",
    )
    database_url: str = setting(
        "store",
        "RUNSVC_DATABASE_URL",
        "",
        str,
        "e.g. `postgresql+psycopg2://user@host/db`",
        shown="sqlite:///$RUNSVC_DATA_DIR/runsvc.db",
    )
    # PostgreSQL connections one process opens at most (None: twice the RPC threads).
    database_max_connections: int | None = setting(
        "store",
        "RUNSVC_DATABASE_MAX_CONNECTIONS",
        None,
        _bounded_int(1, 10_000),
        "PostgreSQL connections one process opens at most (half kept open); size it per host "
        "with the formula in the capacity guide",
        shown="twice RUNSVC_GRPC_MAX_WORKERS (64)",
    )
    # Concurrency slots
    tenant_slots: int = setting(
        "slots",
        "RUNSVC_TENANT_SLOTS",
        SlotLimits.default,
        _positive_int,
        "concurrent in-progress jobs per tenant",
    )
    tenant_slot_overrides: Mapping[str, int] = setting(
        "slots",
        "RUNSVC_TENANT_SLOT_OVERRIDES",
        {},
        _overrides,
        "per-tenant limits, `acme=5,globex=20`",
    )
    # Slots in Redis (unset URL: the store-backed slots, the embedded default).
    redis_url: str = setting(
        "redis",
        "RUNSVC_REDIS_URL",
        "",
        _redis_url,
        "concurrency slots in Redis (`redis://…`); unset: the store-backed slots",
        secret=True,
    )
    redis_key_prefix: str = setting(
        "redis", "RUNSVC_REDIS_KEY_PREFIX", "runsvc:", _key_prefix, "prefix of every Redis key"
    )
    redis_timeout_seconds: float = setting(
        "redis",
        "RUNSVC_REDIS_TIMEOUT_SECONDS",
        0.5,
        _positive_float,
        "connect and read timeout of one Redis call (no client retries)",
    )
    slot_ttl_seconds: float = setting(
        "redis",
        "RUNSVC_SLOT_TTL_SECONDS",
        120.0,
        _positive_float,
        "a slot nobody refreshes expires after this; must exceed `RUNSVC_STALE_AFTER_SECONDS`",
    )
    slot_orphan_grace_seconds: float = setting(
        "redis",
        "RUNSVC_SLOT_ORPHAN_GRACE_SECONDS",
        10.0,
        _positive_float,
        "the reconciler removes a slot no job holds only once it was granted this long ago",
    )
    slot_reconcile_interval_seconds: float = setting(
        "redis",
        "RUNSVC_SLOT_RECONCILE_INTERVAL_SECONDS",
        30.0,
        _positive_float,
        "how often Redis is compared with the database (by one replica of the fleet, which "
        "holds the `leases` row for the interval)",
    )
    slot_relay_interval_seconds: float = setting(
        "redis",
        "RUNSVC_SLOT_RELAY_INTERVAL_SECONDS",
        1.0,
        _positive_float,
        "how often the relay looks for pending releases",
    )
    slot_relay_max_backoff_seconds: float = setting(
        "redis",
        "RUNSVC_SLOT_RELAY_MAX_BACKOFF_SECONDS",
        5.0,
        _positive_float,
        "the relay's retry delay doubles up to this while Redis is down",
    )
    # Liveness and the reaper
    stale_after_seconds: float = setting(
        "liveness",
        "RUNSVC_STALE_AFTER_SECONDS",
        _LIVENESS.stale_after.total_seconds(),
        _positive_float,
        "a running run with no heartbeat for this long is stale (fractions allowed)",
    )
    reap_interval_seconds: float = setting(
        "liveness",
        "RUNSVC_REAP_INTERVAL_SECONDS",
        5.0,
        _positive_float,
        "how often the reaper looks for stale runs",
    )
    startup_cleanup_after_seconds: float = setting(
        "liveness",
        "RUNSVC_STARTUP_CLEANUP_AFTER_SECONDS",
        _LIVENESS.startup_cleanup_after.total_seconds(),
        _positive_float,
        "at start, runs silent this long stop as `STARTUP_CLEANUP`",
    )
    cancel_grace_seconds: float = setting(
        "liveness",
        "RUNSVC_CANCEL_GRACE_SECONDS",
        _LIVENESS.cancel_grace.total_seconds(),
        _positive_float,
        "a cancel request the worker never acknowledges ends the run after this",
    )
    # The reaper's breaker: a pass that would stop more than this share of the
    # running runs stops none (only with at least the minimum running).
    reaper_breaker_share: float = setting(
        "liveness",
        "RUNSVC_REAPER_BREAKER_SHARE",
        _LIVENESS.breaker_share,
        _share,
        "a reaper pass that would stop more than this share of the running runs stops none "
        "(`1`: off)",
    )
    reaper_breaker_min_running: int = setting(
        "liveness",
        "RUNSVC_REAPER_BREAKER_MIN_RUNNING",
        _LIVENESS.breaker_min_running,
        _positive_int,
        "the breaker only judges once at least this many runs are running",
    )
    # Heartbeats
    heartbeat_batch_max: int = setting(
        "heartbeats",
        "RUNSVC_HEARTBEAT_BATCH_MAX",
        _HEARTBEATS.max_batch,
        _positive_int,
        "most heartbeats written by one statement and one commit (1: one each)",
    )
    heartbeat_batch_delay_seconds: float = setting(
        "heartbeats",
        "RUNSVC_HEARTBEAT_BATCH_DELAY_SECONDS",
        _HEARTBEATS.max_delay,
        _short_delay,
        "how long the oldest queued heartbeat waits for company (0 to 1)",
    )
    heartbeat_queue_max: int = setting(
        "heartbeats",
        "RUNSVC_HEARTBEAT_QUEUE_MAX",
        _HEARTBEATS.max_queue,
        _positive_int,
        "queued heartbeats before callers wait (and after 5 s get `UNAVAILABLE`)",
    )
    # Metrics
    # None: no exporter (RUNSVC_METRICS_ADDRESS=off, or set to nothing).
    metrics_address: str | None = setting(
        "metrics",
        "RUNSVC_METRICS_ADDRESS",
        "127.0.0.1:9464",
        _optional_address,
        "where `/metrics` is served; `off` (or set to nothing) serves none; with "
        "`serve --workers N`, process i serves on the port + i",
        empty_is_value=True,
    )
    metrics_tenant_series: int = setting(
        "metrics",
        "RUNSVC_METRICS_TENANT_SERIES",
        0,
        _tenant_series,
        "per-tenant live-run series for at most this many tenants (the rest summed as "
        "`_other`); 0 is off, 1000 the cap",
    )

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'runsvc.db'}"

    @property
    def jwt_secret_file(self) -> Path:
        return self.jwt_secret_path or self.data_dir / "jwt-secret"

    def liveness(self) -> LivenessPolicy:
        return LivenessPolicy(
            stale_after=timedelta(seconds=self.stale_after_seconds),
            startup_cleanup_after=timedelta(seconds=self.startup_cleanup_after_seconds),
            cancel_grace=timedelta(seconds=self.cancel_grace_seconds),
            breaker_share=self.reaper_breaker_share,
            breaker_min_running=self.reaper_breaker_min_running,
        )

    def slot_limits(self) -> SlotLimits:
        return SlotLimits(default=self.tenant_slots, per_tenant=dict(self.tenant_slot_overrides))

    def group_commit(self) -> GroupCommit:
        return GroupCommit(
            max_batch=self.heartbeat_batch_max,
            max_delay=self.heartbeat_batch_delay_seconds,
            max_queue=self.heartbeat_queue_max,
        )


def declared() -> list[Field[Any]]:
    """Every setting, in the reference's order (by group, then as declared)."""
    order = list(GROUPS)
    return sorted(fields(Settings), key=lambda f: order.index(f.metadata["group"]))


def variables() -> list[str]:
    return [f.metadata["variable"] for f in declared()]


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``environ`` (default: the process environment)."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    problems: list[str] = []
    for declared_field in fields(Settings):
        meta = declared_field.metadata
        name = meta["variable"]
        raw = env.get(name)
        if raw is None or (raw == "" and not meta["empty_is_value"]):
            continue
        try:
            values[declared_field.name] = meta["parse"](raw)
        except ValueError as error:
            shown = "(hidden)" if meta["secret"] else repr(raw)
            problems.append(f"{name}={shown}: {error}")
    if problems:
        raise SettingsError("invalid settings:\n  " + "\n  ".join(problems))
    # Absolute from the start: the secret and the embedded database are found in
    # one place whatever folder a later command runs from, and logs name it fully.
    settings = Settings(**values)  # type: ignore[arg-type]
    settings = replace(settings, data_dir=settings.data_dir.absolute())
    if settings.startup_cleanup_after_seconds < settings.stale_after_seconds:
        raise SettingsError(
            "invalid settings:\n  RUNSVC_STARTUP_CLEANUP_AFTER_SECONDS must not be shorter "
            "than RUNSVC_STALE_AFTER_SECONDS"
        )
    _check_security(settings)
    if settings.redis_url and settings.slot_ttl_seconds <= settings.stale_after_seconds:
        raise SettingsError(
            "invalid settings:\n  RUNSVC_SLOT_TTL_SECONDS must be longer than "
            "RUNSVC_STALE_AFTER_SECONDS (a live worker's slots must not expire)"
        )
    return settings


def _check_security(settings: Settings) -> None:
    problems = []
    if set(settings.jwt_algorithms) - {"HS256"} and not (
        settings.jwt_public_key_file or settings.jwt_jwks_file
    ):
        problems.append(
            "RUNSVC_JWT_ALGORITHMS with RS256 or ES256 needs RUNSVC_JWT_PUBLIC_KEY_FILE "
            "or RUNSVC_JWT_JWKS_FILE"
        )
    if settings.jwt_public_key_file and settings.jwt_jwks_file:
        problems.append("set RUNSVC_JWT_PUBLIC_KEY_FILE or RUNSVC_JWT_JWKS_FILE, not both")
    if bool(settings.tls_cert_file) != bool(settings.tls_key_file):
        problems.append("RUNSVC_TLS_CERT_FILE and RUNSVC_TLS_KEY_FILE go together")
    if settings.tls_client_ca_file and not settings.tls_cert_file:
        problems.append("RUNSVC_TLS_CLIENT_CA_FILE needs RUNSVC_TLS_CERT_FILE")
    if problems:
        raise SettingsError("invalid settings:\n  " + "\n  ".join(problems))
