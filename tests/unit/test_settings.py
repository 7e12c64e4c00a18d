"""Settings from RUNSVC_* variables: defaults, parsing, and one message for every problem."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest

from runsvc import settings
from runsvc.settings import SettingsError


def test_defaults() -> None:
    loaded = settings.load({})
    assert loaded.stale_after_seconds == 30
    assert loaded.reap_interval_seconds == 5
    assert loaded.startup_cleanup_after_seconds == 300
    assert loaded.cancel_grace_seconds == 60
    assert loaded.tenant_slots == 10
    assert loaded.tenant_slot_overrides == {}
    assert loaded.grpc_address == "127.0.0.1:50051"
    assert loaded.data_dir == Path.cwd() / "data"  # made absolute at start
    assert loaded.database_url == ""
    assert loaded.effective_database_url == f"sqlite:///{Path.cwd()}/data/runsvc.db"
    assert loaded.jwt_secret is None
    assert loaded.jwt_secret_file == Path.cwd() / "data" / "jwt-secret"
    assert loaded.log_level == "INFO"


def test_load_ignores_the_process_environment_when_given_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RUNSVC_TENANT_SLOTS", "77")
    assert settings.load({}).tenant_slots == 10
    assert settings.load().tenant_slots == 77


def test_empty_values_mean_the_default() -> None:
    loaded = settings.load({"RUNSVC_STALE_AFTER_SECONDS": "", "RUNSVC_GRPC_ADDRESS": ""})
    assert loaded.stale_after_seconds == 30
    assert loaded.grpc_address == "127.0.0.1:50051"


def test_sqlite_url_lives_under_the_data_dir(tmp_path: Path) -> None:
    loaded = settings.load({"RUNSVC_DATA_DIR": str(tmp_path)})
    assert loaded.data_dir == tmp_path
    assert loaded.effective_database_url == f"sqlite:///{tmp_path}/runsvc.db"
    assert loaded.jwt_secret_file == tmp_path / "jwt-secret"


def test_an_explicit_database_url_wins(tmp_path: Path) -> None:
    url = "postgresql+psycopg2://runsvc@db:5432/runsvc"
    loaded = settings.load({"RUNSVC_DATA_DIR": str(tmp_path), "RUNSVC_DATABASE_URL": url})
    assert loaded.effective_database_url == url


def test_values_are_parsed() -> None:
    loaded = settings.load(
        {
            "RUNSVC_GRPC_ADDRESS": "0.0.0.0:6000",
            "RUNSVC_STALE_AFTER_SECONDS": "1.5",
            "RUNSVC_REAP_INTERVAL_SECONDS": "0.5",
            "RUNSVC_STARTUP_CLEANUP_AFTER_SECONDS": "2",
            "RUNSVC_CANCEL_GRACE_SECONDS": "4.25",
            "RUNSVC_TENANT_SLOTS": "3",
            "RUNSVC_JWT_SECRET": "s3cret-that-is-at-least-32-bytes-long",
            "RUNSVC_GRPC_MAX_WORKERS": "8",
            "RUNSVC_SHUTDOWN_GRACE_SECONDS": "0.1",
            "RUNSVC_LOG_LEVEL": "debug",
        }
    )
    assert loaded.grpc_address == "0.0.0.0:6000"
    assert loaded.stale_after_seconds == 1.5
    assert loaded.reap_interval_seconds == 0.5
    assert loaded.startup_cleanup_after_seconds == 2
    assert loaded.cancel_grace_seconds == 4.25
    assert loaded.tenant_slots == 3
    assert loaded.jwt_secret == "s3cret-that-is-at-least-32-bytes-long"
    assert loaded.grpc_max_workers == 8
    assert loaded.shutdown_grace_seconds == 0.1
    assert loaded.log_level == "DEBUG"


def test_liveness_policy_follows_the_settings() -> None:
    policy = settings.load(
        {
            "RUNSVC_STALE_AFTER_SECONDS": "1.5",
            "RUNSVC_STARTUP_CLEANUP_AFTER_SECONDS": "2",
            "RUNSVC_CANCEL_GRACE_SECONDS": "4.25",
        }
    ).liveness()
    assert policy.stale_after == timedelta(milliseconds=1500)
    assert policy.startup_cleanup_after == timedelta(seconds=2)
    assert policy.cancel_grace == timedelta(milliseconds=4250)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("tenant-a=5,tenant-b=20", {"tenant-a": 5, "tenant-b": 20}),
        (" tenant-a = 5 , tenant-b=20 ,", {"tenant-a": 5, "tenant-b": 20}),
        ("solo=1", {"solo": 1}),
        (",", {}),
    ],
)
def test_tenant_slot_overrides(raw: str, expected: dict[str, int]) -> None:
    loaded = settings.load({"RUNSVC_TENANT_SLOT_OVERRIDES": raw, "RUNSVC_TENANT_SLOTS": "4"})
    assert loaded.tenant_slot_overrides == expected
    limits = loaded.slot_limits()
    assert limits.default == 4
    assert limits.per_tenant == expected


@pytest.mark.parametrize("raw", ["tenant-a", "tenant-a=", "=5", "tenant-a=0", "tenant-a=x"])
def test_bad_tenant_slot_overrides(raw: str) -> None:
    with pytest.raises(SettingsError, match="RUNSVC_TENANT_SLOT_OVERRIDES"):
        settings.load({"RUNSVC_TENANT_SLOT_OVERRIDES": raw})


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("RUNSVC_STALE_AFTER_SECONDS", "abc"),
        ("RUNSVC_STALE_AFTER_SECONDS", "0"),
        ("RUNSVC_STALE_AFTER_SECONDS", "-1"),
        ("RUNSVC_STALE_AFTER_SECONDS", "nan"),
        ("RUNSVC_REAP_INTERVAL_SECONDS", "0"),
        ("RUNSVC_CANCEL_GRACE_SECONDS", "-0.5"),
        ("RUNSVC_TENANT_SLOTS", "0"),
        ("RUNSVC_TENANT_SLOTS", "-1"),
        ("RUNSVC_TENANT_SLOTS", "1.5"),
        ("RUNSVC_GRPC_MAX_WORKERS", "many"),
        ("RUNSVC_GRPC_ADDRESS", "127.0.0.1"),
        ("RUNSVC_GRPC_ADDRESS", ":50051"),
        ("RUNSVC_GRPC_ADDRESS", "localhost:port"),
        ("RUNSVC_GRPC_ADDRESS", "localhost:70000"),
        ("RUNSVC_LOG_LEVEL", "LOUD"),
    ],
)
def test_a_bad_value_is_named(name: str, raw: str) -> None:
    with pytest.raises(SettingsError) as raised:
        settings.load({name: raw})
    assert f"{name}={raw!r}" in str(raised.value)


def test_every_bad_variable_is_named_at_once() -> None:
    bad = {
        "RUNSVC_STALE_AFTER_SECONDS": "abc",
        "RUNSVC_REAP_INTERVAL_SECONDS": "0",
        "RUNSVC_TENANT_SLOTS": "-1",
        "RUNSVC_GRPC_ADDRESS": "no-port",
        "RUNSVC_TENANT_SLOT_OVERRIDES": "tenant-a",
    }
    with pytest.raises(SettingsError) as raised:
        settings.load({**bad, "RUNSVC_CANCEL_GRACE_SECONDS": "12"})
    message = str(raised.value)
    for name in bad:
        assert name in message
    assert "RUNSVC_CANCEL_GRACE_SECONDS" not in message
    assert len(message.splitlines()) == 1 + len(bad)


@pytest.mark.parametrize(
    "name",
    [
        "RUNSVC_STALE_AFTER_SECONDS",
        "RUNSVC_REAP_INTERVAL_SECONDS",
        "RUNSVC_STARTUP_CLEANUP_AFTER_SECONDS",
        "RUNSVC_CANCEL_GRACE_SECONDS",
        "RUNSVC_SHUTDOWN_GRACE_SECONDS",
    ],
)
def test_an_infinite_duration_is_refused(name: str) -> None:
    # An infinite duration cannot become a timedelta nor a wait or join timeout: it must be
    # refused here, not fail later with OverflowError in the reaper, the liveness policy or
    # the shutdown.
    with pytest.raises(SettingsError) as raised:
        settings.load({name: "inf"})
    assert f"{name}='inf'" in str(raised.value)


def test_startup_cleanup_shorter_than_stale_is_refused() -> None:
    with pytest.raises(SettingsError) as raised:
        settings.load(
            {
                "RUNSVC_STALE_AFTER_SECONDS": "60",
                "RUNSVC_STARTUP_CLEANUP_AFTER_SECONDS": "30",
            }
        )
    message = str(raised.value)
    assert "RUNSVC_STARTUP_CLEANUP_AFTER_SECONDS" in message
    assert "RUNSVC_STALE_AFTER_SECONDS" in message


def test_startup_cleanup_equal_to_stale_is_allowed() -> None:
    loaded = settings.load(
        {"RUNSVC_STALE_AFTER_SECONDS": "45", "RUNSVC_STARTUP_CLEANUP_AFTER_SECONDS": "45"}
    )
    assert loaded.startup_cleanup_after_seconds == loaded.stale_after_seconds == 45


def test_a_short_secret_is_refused_without_echoing_it() -> None:
    with pytest.raises(SettingsError) as refused:
        settings.load({"RUNSVC_JWT_SECRET": "tiny-secret"})
    assert "RUNSVC_JWT_SECRET=(hidden)" in str(refused.value)
    assert "tiny-secret" not in str(refused.value)


# --- security settings ------------------------------------------------------------------


def test_security_defaults_keep_hs256_alone() -> None:
    loaded = settings.load({})
    assert loaded.jwt_algorithms == ("HS256",)
    assert loaded.grpc_max_message_bytes < 4 * 1024 * 1024
    assert loaded.rate_limits == {}


def test_algorithms_and_keys(tmp_path: Path) -> None:
    pem = tmp_path / "keys.pem"
    pem.write_text("x")
    loaded = settings.load(
        {"RUNSVC_JWT_ALGORITHMS": "es256, HS256", "RUNSVC_JWT_PUBLIC_KEY_FILE": str(pem)}
    )
    assert loaded.jwt_algorithms == ("ES256", "HS256")
    for bad in ("none", "HS512", ""):
        if bad:
            with pytest.raises(settings.SettingsError, match="RUNSVC_JWT_ALGORITHMS"):
                settings.load({"RUNSVC_JWT_ALGORITHMS": bad})
    with pytest.raises(settings.SettingsError, match="needs RUNSVC_JWT_PUBLIC_KEY_FILE"):
        settings.load({"RUNSVC_JWT_ALGORITHMS": "RS256"})
    with pytest.raises(settings.SettingsError, match="no such file"):
        settings.load({"RUNSVC_JWT_JWKS_FILE": str(tmp_path / "missing.json")})


def test_rate_limits() -> None:
    loaded = settings.load({"RUNSVC_RATE_LIMITS": "read=5:10, heartbeat=2"})
    assert loaded.rate_limits == {"read": (5.0, 10.0), "heartbeat": (2.0, 2.0)}
    for bad in ("reads=5", "read=0:1", "read=5:0", "read=nan", "read"):
        with pytest.raises(settings.SettingsError, match="RUNSVC_RATE_LIMITS"):
            settings.load({"RUNSVC_RATE_LIMITS": bad})


def test_tls_files_go_together(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(settings.SettingsError, match="go together"):
        settings.load({"RUNSVC_TLS_CERT_FILE": str(cert)})
    with pytest.raises(settings.SettingsError, match="needs RUNSVC_TLS_CERT_FILE"):
        settings.load({"RUNSVC_TLS_CLIENT_CA_FILE": str(cert)})


def test_message_size_stays_under_grpc_default() -> None:
    with pytest.raises(settings.SettingsError, match="RUNSVC_GRPC_MAX_MESSAGE_BYTES"):
        settings.load({"RUNSVC_GRPC_MAX_MESSAGE_BYTES": str(8 * 1024 * 1024)})


def test_redis_slot_settings() -> None:
    assert settings.load({}).redis_url == ""
    loaded = settings.load(
        {
            "RUNSVC_REDIS_URL": "redis://127.0.0.1:6379/2",
            "RUNSVC_REDIS_KEY_PREFIX": "acme:",
            "RUNSVC_SLOT_TTL_SECONDS": "90",
            "RUNSVC_SLOT_ORPHAN_GRACE_SECONDS": "5",
            "RUNSVC_SLOT_RECONCILE_INTERVAL_SECONDS": "15",
            "RUNSVC_SLOT_RELAY_MAX_BACKOFF_SECONDS": "3",
        }
    )
    assert (loaded.redis_url, loaded.redis_key_prefix, loaded.slot_ttl_seconds) == (
        "redis://127.0.0.1:6379/2",
        "acme:",
        90.0,
    )


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"RUNSVC_REDIS_URL": "http://x"}, "RUNSVC_REDIS_URL=(hidden)"),
        ({"RUNSVC_REDIS_KEY_PREFIX": "a b"}, "RUNSVC_REDIS_KEY_PREFIX"),
        (
            {"RUNSVC_REDIS_URL": "redis://h:1/0", "RUNSVC_SLOT_TTL_SECONDS": "30"},
            "RUNSVC_SLOT_TTL_SECONDS must be longer",
        ),
    ],
)
def test_bad_redis_slot_settings(env: dict[str, str], named: str) -> None:
    with pytest.raises(settings.SettingsError, match=re.escape(named)):
        settings.load(env)


def test_heartbeat_batch_settings() -> None:
    policy = settings.load(
        {
            "RUNSVC_HEARTBEAT_BATCH_MAX": "64",
            "RUNSVC_HEARTBEAT_BATCH_DELAY_SECONDS": "0",
            "RUNSVC_HEARTBEAT_QUEUE_MAX": "100",
        }
    ).group_commit()
    assert (policy.max_batch, policy.max_delay, policy.max_queue) == (64, 0.0, 100)
    with pytest.raises(SettingsError) as refused:
        settings.load(
            {"RUNSVC_HEARTBEAT_BATCH_MAX": "0", "RUNSVC_HEARTBEAT_BATCH_DELAY_SECONDS": "2"}
        )
    assert "RUNSVC_HEARTBEAT_BATCH_MAX='0': must be a whole number" in str(refused.value)
    assert "RUNSVC_HEARTBEAT_BATCH_DELAY_SECONDS='2'" in str(refused.value)
