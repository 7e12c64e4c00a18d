"""PostgreSQL crashed (``pg_ctl stop -m immediate``) and back within the threshold.

One cluster serves every trial (``initdb`` is the slow part); each trial empties it first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy import create_engine

from runsvc.store.schema import metadata
from runsvc_client.v1 import run_service_pb2 as pb
from runsvc_client.v1 import run_service_pb2_grpc as pb_grpc
from tests.e2e.test_cli import free_port
from tests.faults import pg_cluster
from tests.faults.conftest import FULL, REAP_INTERVAL, Fleet, Store, issue
from tests.support.databases import IN_CI, truncate

pytestmark = pytest.mark.postgres

STALE = 4.0
DOWN = 1.5
CALL_DEADLINE = 2.5
REPEATS = 20 if FULL else 1


@pytest.fixture(scope="module")
def cluster() -> Iterator[pg_cluster.Cluster]:
    if not pg_cluster.available():
        if IN_CI:
            pytest.fail("PostgreSQL 15 binaries are needed for the crash test")
        pytest.skip("PostgreSQL 15 binaries are not installed")
    own = pg_cluster.Cluster(free_port())
    try:
        own.start()
        engine = create_engine(own.url)
        metadata.create_all(engine)
        engine.dispose()
        yield own
    finally:
        own.destroy()


@pytest.mark.parametrize("trial", range(REPEATS))
def test_a_database_crash_shorter_than_the_threshold_stops_nothing(
    cluster: pg_cluster.Cluster, tmp_path: Path, trial: int
) -> None:
    if not cluster.running():  # an earlier trial failed while it was down
        cluster.start()
    truncate(cluster.url)
    fleet = Fleet(tmp_path, cluster.url)
    store = Store(cluster.url)
    try:
        server = fleet.server(RUNSVC_STALE_AFTER_SECONDS=str(STALE))
        run_ids = [fleet.create_run(server.address, f"t{i}", jobs=50) for i in range(2)]
        workers = [
            fleet.worker(server.address, f"t{i}", f"w{i}", "--hold", "0.3") for i in range(2)
        ]
        assert sorted(w.run_id() for w in workers) == sorted(run_ids)
        time.sleep(1.0)

        outcomes: list[tuple[str, float]] = []
        stop = threading.Event()

        def probe() -> None:
            metadata_ = [("authorization", f"Bearer {issue('backend', 't0')}")]
            with grpc.insecure_channel(server.address) as channel:
                stub = pb_grpc.RunServiceStub(channel)
                while not stop.is_set():
                    started = time.monotonic()
                    try:
                        stub.GetActive(
                            pb.GetActiveRequest(), metadata=metadata_, timeout=CALL_DEADLINE
                        )
                        code = "OK"
                    except grpc.RpcError as error:
                        code = error.code().name
                    outcomes.append((code, time.monotonic() - started))
                    time.sleep(0.05)

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            time.sleep(0.3)
            cluster.crash()
            time.sleep(DOWN)
            cluster.start()
            time.sleep(STALE + 3 * REAP_INTERVAL + 1.0)
        finally:
            stop.set()
            prober.join(timeout=15)
        assert not prober.is_alive()

        codes = {code for code, _ in outcomes}
        assert "UNAVAILABLE" in codes, outcomes
        assert codes <= {"OK", "UNAVAILABLE"}, outcomes
        assert max(took for _, took in outcomes) < CALL_DEADLINE + 0.2
        assert outcomes[-1][0] == "OK"
        assert server.process.poll() is None
        assert [store.run(r).state for r in run_ids] == ["RUNNING"] * 2
        assert store.stale_detections() == 0
        for worker in workers:
            assert worker.process.poll() is None, worker.log.read_text()
            assert worker.lines()[-1]["code"] == "OK"
        assert store.violations() == []
    finally:
        fleet.stop_all()
        store.close()
