"""PostgreSQL partitioned from the server behind the loopback proxy (packets held, no RST)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from sqlalchemy.engine import make_url

from runsvc_client.v1 import run_service_pb2 as pb
from runsvc_client.v1 import run_service_pb2_grpc as pb_grpc
from tests.faults.conftest import (
    FULL,
    REAP_INTERVAL,
    Fleet,
    Store,
    issue,
)
from tests.support.proxy import TcpProxy

pytestmark = pytest.mark.postgres

REPEATS = 20 if FULL else 1
CALL_DEADLINE = 2.5  # connecting takes up to 2 s: libpq's shortest connect_timeout
STALE = 4.0
OUTAGE = 3.0  # longer than a call's deadline, shorter than the threshold


@pytest.fixture
def pg_proxy(postgres_url: str) -> Iterator[tuple[TcpProxy, str]]:
    url = make_url(postgres_url)
    with TcpProxy(upstream=(url.host or "127.0.0.1", url.port or 5432)) as proxy:
        host, port = proxy.address.rsplit(":", 1)
        yield proxy, url.set(host=host, port=int(port)).render_as_string(hide_password=False)


def _probe(
    address: str, tenant: str, outcomes: list[tuple[str, float]], stop: threading.Event
) -> None:
    """GetActive with a short deadline, over and over: what a caller sees during the outage."""
    metadata = [("authorization", f"Bearer {issue('backend', tenant)}")]
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.RunServiceStub(channel)
        while not stop.is_set():
            started = time.monotonic()
            try:
                stub.GetActive(pb.GetActiveRequest(), metadata=metadata, timeout=CALL_DEADLINE)
                code = "OK"
            except grpc.RpcError as error:
                code = error.code().name
            outcomes.append((code, time.monotonic() - started))
            time.sleep(0.05)


@pytest.mark.parametrize("trial", range(REPEATS))
def test_a_partition_shorter_than_the_threshold_stops_nothing(
    fleet: Fleet, store: Store, pg_proxy: tuple[TcpProxy, str], trial: int
) -> None:
    proxy, proxied_url = pg_proxy
    server = fleet.server(RUNSVC_DATABASE_URL=proxied_url, RUNSVC_STALE_AFTER_SECONDS=str(STALE))
    run_ids = [fleet.create_run(server.address, f"t{i}", jobs=50) for i in range(2)]
    workers = [fleet.worker(server.address, f"t{i}", f"w{i}", "--hold", "0.3") for i in range(2)]
    assert sorted(w.run_id() for w in workers) == sorted(run_ids)
    time.sleep(1.0)

    outcomes: list[tuple[str, float]] = []
    stop = threading.Event()
    probe = threading.Thread(target=_probe, args=(server.address, "t0", outcomes, stop))
    probe.start()
    try:
        time.sleep(0.3)
        proxy.blackhole()
        time.sleep(OUTAGE)
        proxy.restore()
        time.sleep(STALE + 3 * REAP_INTERVAL + 1.0)
    finally:
        stop.set()
        probe.join(timeout=10)
    assert not probe.is_alive()

    # During the partition calls failed fast, as UNAVAILABLE, never past their deadline.
    codes = {code for code, _ in outcomes}
    assert "UNAVAILABLE" in codes, outcomes
    assert codes <= {"OK", "UNAVAILABLE"}, outcomes
    assert max(took for _, took in outcomes) < CALL_DEADLINE + 0.2
    # The server still answers, and nothing was stopped for the outage.
    assert server.process.poll() is None
    assert [store.run(r).state for r in run_ids] == ["RUNNING"] * 2
    assert store.stale_detections() == 0
    for worker in workers:
        assert worker.process.poll() is None, worker.log.read_text()
        assert worker.lines()[-1]["code"] == "OK"
