"""``runsvc slots show|reconcile`` as an operator runs them, on the embedded store."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import redis

from tests.e2e.test_cli import clean_environ, runsvc_command

pytestmark = pytest.mark.redis


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*runsvc_command(), *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_slots_show_and_reconcile(tmp_path: Path, redis_url: str, redis_prefix: str) -> None:
    env = {**clean_environ(), "RUNSVC_DATA_DIR": str(tmp_path)}
    assert run(env, "migrate").returncode == 0
    refused = run(env, "slots", "show")
    assert refused.returncode == 2
    assert "RUNSVC_REDIS_URL is not set" in refused.stderr

    env |= {"RUNSVC_REDIS_URL": redis_url, "RUNSVC_REDIS_KEY_PREFIX": redis_prefix}
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    # A slot no job holds, granted a minute ago and not expired (lifetime 120 s).
    client.set(f"{redis_prefix}ready", "1")
    seconds, _ = client.time()
    client.zadd(f"{redis_prefix}slots:acme", {"run|1|job|tok": (seconds + 60) * 1000})
    shown = run(env, "slots", "show", "--tenant", "acme")
    assert shown.returncode == 0, shown.stderr
    figures = json.loads(shown.stdout)
    assert figures["tenants"] == [{"tenant_id": "acme", "in_use": 1, "in_progress": 0, "limit": 10}]
    assert figures["release_backlog"] == 0
    # The invariant checker sees the same drift: a slot no job in progress holds.
    checked = run(env, "check")
    assert checked.returncode == 1, checked.stderr
    assert json.loads(checked.stdout.splitlines()[0])["kind"] == "SLOTS"
    env["RUNSVC_SLOT_ORPHAN_GRACE_SECONDS"] = "0.001"
    fixed = run(env, "slots", "reconcile", "--tenant", "acme")
    assert fixed.returncode == 0, fixed.stderr
    assert json.loads(fixed.stdout)["orphans_removed"] == 1
    assert client.zcard(f"{redis_prefix}slots:acme") == 0
    assert run(env, "check").returncode == 0
    client.close()
