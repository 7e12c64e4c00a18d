"""The watchdog cuts a connection whose server does not answer, within the call's deadline."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy.engine import make_url

from runsvc import deadline
from runsvc.errors import Unavailable
from runsvc.store.engine import Database, make_engine
from tests.support.proxy import TcpProxy

pytestmark = pytest.mark.postgres


def test_a_partitioned_call_fails_unavailable_before_its_deadline(postgres_url: str) -> None:
    url = make_url(postgres_url)
    with TcpProxy(upstream=(url.host or "127.0.0.1", url.port or 5432)) as proxy:
        host, port = proxy.address.rsplit(":", 1)
        through = url.set(host=host, port=int(port)).render_as_string(hide_password=False)
        db = Database(make_engine(through, max_connections=2))
        try:
            assert db.run(lambda conn: conn.exec_driver_sql("SELECT 1").scalar()) == 1
            assert db.trust.since is None  # Context marks trust; a bare run only loses it
            proxy.blackhole()
            started = time.monotonic()
            with deadline.bound(started + 1.0), pytest.raises(Unavailable):
                db.run(lambda conn: conn.exec_driver_sql("SELECT 1").scalar())
            took = time.monotonic() - started
            assert took < 1.0, took
            assert db.watchdog.cuts == 1
            proxy.restore()
            # The pool was invalidated: the next call connects afresh and works.
            assert db.run(lambda conn: conn.exec_driver_sql("SELECT 2").scalar()) == 2
        finally:
            db.dispose()
    assert not [t for t in threading.enumerate() if t.name.startswith("proxy-")]


def test_dispose_ends_the_watchdog_thread(postgres_url: str) -> None:
    """A disposed Database leaves no thread behind (one per replica restart would pile up)."""
    before = {t.ident for t in threading.enumerate() if t.name == "runsvc-db-watchdog"}
    for _ in range(3):
        db = Database(make_engine(postgres_url, max_connections=2))
        assert db.run(lambda conn: conn.exec_driver_sql("SELECT 1").scalar()) == 1
        watchers = {t.ident for t in threading.enumerate() if t.name == "runsvc-db-watchdog"}
        assert len(watchers - before) == 1  # the transaction armed it
        db.dispose()
        after = {t.ident for t in threading.enumerate() if t.name == "runsvc-db-watchdog"}
        assert after - before == set()
