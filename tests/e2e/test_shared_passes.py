"""Two live servers on one store and one Redis: the reconciler passes once for both."""

from __future__ import annotations

from pathlib import Path

import pytest

from runsvc.server import Server, build
from runsvc.settings import Settings
from tests.e2e.conftest import SECRET
from tests.e2e.test_metrics import scrape, value
from tests.support.waiting import wait_for

pytestmark = pytest.mark.redis

PASSES = "runsvc_background_passes_total"


def test_two_servers_take_turns_at_the_reconciler(
    db_url: str, tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        database_url=db_url,
        grpc_address="127.0.0.1:0",
        metrics_address="127.0.0.1:0",
        reap_interval_seconds=3600,
        jwt_secret=SECRET,
        grpc_max_workers=4,
        redis_url=redis_url,
        redis_key_prefix=redis_prefix,
        # One interval lasts the whole test: whoever takes the first turn holds it.
        slot_reconcile_interval_seconds=3600,
    )
    servers = [Server(build(settings), secret=SECRET) for _ in range(2)]
    try:
        for server in servers:
            # Each reconciles at start (the first rebuilds the empty slots and takes the
            # turn), then its reconciler thread asks again at once.
            server.start()

        def passes(result: str) -> float:
            labels = {"job": "slot_reconciler", "result": result}
            return sum(value(scrape(s), PASSES, **labels) for s in servers)

        wait_for(lambda: passes("done") + passes("skipped") == 4, timeout=15, step=0.1)
        assert passes("done") == 1
    finally:
        for server in servers:
            server.stop(grace=0)
