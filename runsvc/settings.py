"""Settings: one object, read once from ``RUNSVC_*`` environment variables.

Every value is checked at start, and every problem is reported in one clear
message naming the variable. The defaults are the seed's values and are
listed in the README.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

from runsvc.domain import LivenessPolicy
from runsvc.slots import SlotLimits

T = TypeVar("T")


class SettingsError(ValueError):
    """The environment holds settings runsvc cannot use."""


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("data")
    database_url: str = ""
    grpc_address: str = "127.0.0.1:50051"
    stale_after_seconds: float = 30.0
    reap_interval_seconds: float = 5.0
    startup_cleanup_after_seconds: float = 300.0
    cancel_grace_seconds: float = 60.0
    tenant_slots: int = 10
    tenant_slot_overrides: Mapping[str, int] = field(default_factory=dict)
    jwt_secret: str | None = None
    # A file holding the HS256 secret (a mounted Secret); unset: $RUNSVC_DATA_DIR/jwt-secret.
    jwt_secret_path: Path | None = None
    grpc_max_workers: int = 32
    # PostgreSQL connections one process opens at most (None: twice the RPC threads).
    database_max_connections: int | None = None
    shutdown_grace_seconds: float = 10.0
    log_level: str = "INFO"
    # Security settings (SECURITY.md): token checks, TLS, limits and rate limits.
    jwt_algorithms: tuple[str, ...] = ("HS256",)
    jwt_public_key_file: Path | None = None
    jwt_jwks_file: Path | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway_seconds: float = 5.0
    jwt_max_lifetime_seconds: float = 86400.0
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    grpc_max_message_bytes: int = 1024 * 1024
    grpc_max_metadata_bytes: int = 16 * 1024
    grpc_max_concurrent_streams: int = 100
    grpc_max_concurrent_rpcs: int = 256
    grpc_max_deadline_seconds: float = 30.0
    # A connection is closed gracefully (GOAWAY) after this long, so that clients
    # balancing over a DNS name resolve it again and reach replicas added since.
    grpc_max_connection_age_seconds: float = 300.0
    # The open services (SECURITY.md): reflection only when asked for; their
    # streams (health Watch, reflection) a few at once, each for a bounded time.
    grpc_reflection: bool = False
    grpc_open_streams: int = 4
    grpc_open_stream_seconds: float = 60.0
    # A plaintext port that serves only gRPC health, on threads of its own, for
    # probes that must tell a dead replica from a busy one (None: none).
    health_address: str | None = None
    rate_limits: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    audit_aggregate_seconds: float = 60.0
    # None: no exporter (RUNSVC_METRICS_ADDRESS=off, or set to nothing).
    metrics_address: str | None = "127.0.0.1:9464"
    metrics_tenant_series: int = 0
    # Concurrency slots in Redis (unset: the store-backed slots, the embedded default).
    redis_url: str = ""
    redis_key_prefix: str = "runsvc:"
    redis_timeout_seconds: float = 0.5
    slot_ttl_seconds: float = 120.0
    slot_orphan_grace_seconds: float = 10.0
    slot_reconcile_interval_seconds: float = 30.0
    slot_relay_interval_seconds: float = 1.0
    slot_relay_max_backoff_seconds: float = 5.0
    # Test-only: commit slot releases but never apply them (crash tests). Off by default.
    testonly_hold_slot_releases: bool = False
    heartbeat_group_commit: bool = True
    heartbeat_batch_max: int = 256
    heartbeat_batch_delay_seconds: float = 0.002
    heartbeat_queue_max: int = 4096
    # The reaper's breaker: a pass that would stop more than this share of the
    # running runs stops none (only with at least the minimum running).
    reaper_breaker_share: float = 0.5
    reaper_breaker_min_running: int = 4

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


_PARSERS: dict[str, tuple[str, Callable[[str], object]]] = {
    "RUNSVC_DATA_DIR": ("data_dir", Path),
    "RUNSVC_DATABASE_URL": ("database_url", str),
    "RUNSVC_GRPC_ADDRESS": ("grpc_address", _address),
    "RUNSVC_STALE_AFTER_SECONDS": ("stale_after_seconds", _positive_float),
    "RUNSVC_REAP_INTERVAL_SECONDS": ("reap_interval_seconds", _positive_float),
    "RUNSVC_STARTUP_CLEANUP_AFTER_SECONDS": ("startup_cleanup_after_seconds", _positive_float),
    "RUNSVC_CANCEL_GRACE_SECONDS": ("cancel_grace_seconds", _positive_float),
    "RUNSVC_TENANT_SLOTS": ("tenant_slots", _positive_int),
    "RUNSVC_TENANT_SLOT_OVERRIDES": ("tenant_slot_overrides", _overrides),
    "RUNSVC_JWT_SECRET": ("jwt_secret", _secret),
    "RUNSVC_JWT_SECRET_FILE": ("jwt_secret_path", _existing_file),
    "RUNSVC_GRPC_MAX_WORKERS": ("grpc_max_workers", _positive_int),
    "RUNSVC_DATABASE_MAX_CONNECTIONS": ("database_max_connections", _bounded_int(1, 10_000)),
    "RUNSVC_SHUTDOWN_GRACE_SECONDS": ("shutdown_grace_seconds", _positive_float),
    "RUNSVC_LOG_LEVEL": ("log_level", _log_level),
    "RUNSVC_JWT_ALGORITHMS": ("jwt_algorithms", _algorithms),
    "RUNSVC_JWT_PUBLIC_KEY_FILE": ("jwt_public_key_file", _existing_file),
    "RUNSVC_JWT_JWKS_FILE": ("jwt_jwks_file", _existing_file),
    "RUNSVC_JWT_ISSUER": ("jwt_issuer", str),
    "RUNSVC_JWT_AUDIENCE": ("jwt_audience", str),
    "RUNSVC_JWT_LEEWAY_SECONDS": ("jwt_leeway_seconds", _leeway),
    "RUNSVC_JWT_MAX_LIFETIME_SECONDS": ("jwt_max_lifetime_seconds", _positive_float),
    "RUNSVC_TLS_CERT_FILE": ("tls_cert_file", _existing_file),
    "RUNSVC_TLS_KEY_FILE": ("tls_key_file", _existing_file),
    "RUNSVC_TLS_CLIENT_CA_FILE": ("tls_client_ca_file", _existing_file),
    "RUNSVC_GRPC_MAX_MESSAGE_BYTES": (
        "grpc_max_message_bytes",
        _bounded_int(1024, MAX_GRPC_MESSAGE_BYTES),
    ),
    "RUNSVC_GRPC_MAX_METADATA_BYTES": ("grpc_max_metadata_bytes", _bounded_int(1024, 64 * 1024)),
    "RUNSVC_GRPC_MAX_CONCURRENT_STREAMS": ("grpc_max_concurrent_streams", _bounded_int(1, 1000)),
    "RUNSVC_GRPC_MAX_CONCURRENT_RPCS": ("grpc_max_concurrent_rpcs", _bounded_int(1, 10_000)),
    "RUNSVC_GRPC_MAX_DEADLINE_SECONDS": ("grpc_max_deadline_seconds", _positive_float),
    "RUNSVC_GRPC_MAX_CONNECTION_AGE_SECONDS": ("grpc_max_connection_age_seconds", _positive_float),
    "RUNSVC_GRPC_REFLECTION": ("grpc_reflection", _flag),
    "RUNSVC_GRPC_OPEN_STREAMS": ("grpc_open_streams", _bounded_int(1, 64)),
    "RUNSVC_GRPC_OPEN_STREAM_SECONDS": ("grpc_open_stream_seconds", _positive_float),
    "RUNSVC_HEALTH_ADDRESS": ("health_address", _optional_address),
    "RUNSVC_RATE_LIMITS": ("rate_limits", _rate_limits),
    "RUNSVC_AUDIT_AGGREGATE_SECONDS": ("audit_aggregate_seconds", _positive_float),
    "RUNSVC_METRICS_ADDRESS": ("metrics_address", _optional_address),
    "RUNSVC_METRICS_TENANT_SERIES": ("metrics_tenant_series", _tenant_series),
    "RUNSVC_REDIS_URL": ("redis_url", _redis_url),
    "RUNSVC_REDIS_KEY_PREFIX": ("redis_key_prefix", _key_prefix),
    "RUNSVC_REDIS_TIMEOUT_SECONDS": ("redis_timeout_seconds", _positive_float),
    "RUNSVC_SLOT_TTL_SECONDS": ("slot_ttl_seconds", _positive_float),
    "RUNSVC_SLOT_ORPHAN_GRACE_SECONDS": ("slot_orphan_grace_seconds", _positive_float),
    "RUNSVC_SLOT_RECONCILE_INTERVAL_SECONDS": ("slot_reconcile_interval_seconds", _positive_float),
    "RUNSVC_SLOT_RELAY_INTERVAL_SECONDS": ("slot_relay_interval_seconds", _positive_float),
    "RUNSVC_SLOT_RELAY_MAX_BACKOFF_SECONDS": ("slot_relay_max_backoff_seconds", _positive_float),
    "RUNSVC_TESTONLY_HOLD_SLOT_RELEASES": ("testonly_hold_slot_releases", _flag),
    "RUNSVC_HEARTBEAT_GROUP_COMMIT": ("heartbeat_group_commit", _flag),
    "RUNSVC_HEARTBEAT_BATCH_MAX": ("heartbeat_batch_max", _positive_int),
    "RUNSVC_HEARTBEAT_BATCH_DELAY_SECONDS": ("heartbeat_batch_delay_seconds", _short_delay),
    "RUNSVC_HEARTBEAT_QUEUE_MAX": ("heartbeat_queue_max", _positive_int),
    "RUNSVC_REAPER_BREAKER_SHARE": ("reaper_breaker_share", _share),
    "RUNSVC_REAPER_BREAKER_MIN_RUNNING": ("reaper_breaker_min_running", _positive_int),
}

# Variables whose empty value means something (off) rather than "the default".
_EMPTY_IS_A_VALUE = frozenset({"RUNSVC_METRICS_ADDRESS"})


_SECRETS = frozenset({"RUNSVC_JWT_SECRET", "RUNSVC_REDIS_URL"})


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``environ`` (default: the process environment)."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    problems: list[str] = []
    for name, (attribute, parse) in _PARSERS.items():
        raw = env.get(name)
        if raw is None or (raw == "" and name not in _EMPTY_IS_A_VALUE):
            continue
        try:
            values[attribute] = parse(raw)
        except ValueError as error:
            shown = "(hidden)" if name in _SECRETS else repr(raw)
            problems.append(f"{name}={shown}: {error}")
    if problems:
        raise SettingsError("invalid settings:\n  " + "\n  ".join(problems))
    # Absolute from the start: the secret and the embedded database are found in
    # one place whatever folder a later command runs from, and logs name it fully.
    values["data_dir"] = Path(values.get("data_dir", Settings.data_dir)).absolute()  # type: ignore[arg-type]
    settings = Settings(**values)  # type: ignore[arg-type]
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
