"""Two replicas whose wall clocks are 90 s ahead and 90 s behind: no false stops.

Each replica is a real ``runsvc serve`` process started under libfaketime
(``LD_PRELOAD``, ``FAKETIME=+90`` / ``-90``; the ``libfaketime`` test
dependency ships the library), so every wall-clock read in the process, the
interpreter's, the drivers' and gRPC's, is off by that much; the monotonic
clock is left alone. Liveness is judged on PostgreSQL's clock
(``runsvc/store/clock.py``), so heartbeats written through one replica are
never judged stale by the other, and a worker that really died is still
caught within the usual bound.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import grpc
import pytest

from runsvc_client.v1 import run_service_pb2 as pb
from runsvc_client.v1 import run_service_pb2_grpc as pb_grpc
from tests.e2e.test_cli import ServerProcess, json_lines
from tests.faults.conftest import (
    REAP_INTERVAL,
    STALE_AFTER,
    Fleet,
    Store,
    issue,
)
from tests.support.databases import IN_CI
from tests.support.waiting import wait_for

pytestmark = pytest.mark.postgres

SKEW = 90.0
WORKERS = 4
ALIVE_FOR = 4 * STALE_AFTER  # the live workers heartbeat through several thresholds


def faketime_library() -> Path:
    try:
        import libfaketime
    except ImportError:
        if IN_CI:
            pytest.fail("the libfaketime test dependency is needed for the clock skew test")
        pytest.skip("libfaketime is not installed (pip install -e '.[test]')")
    library = Path(libfaketime.__file__).parent / "vendor/libfaketime/src/libfaketime.so.1"
    assert library.exists(), library
    return library


def skewed(fleet: Fleet, library: Path, offset: float) -> ServerProcess:
    return fleet.server(
        LD_PRELOAD=str(library),
        FAKETIME=f"{offset:+.0f}",
        FAKETIME_DONT_FAKE_MONOTONIC="1",
        # The tokens are minted on the test's (true) clock: to the replica that is behind,
        # their "issued at" lies 90 s in the future, which the verifier does not judge.
    )


def logged_skew(server: ServerProcess, started: float) -> float:
    """How far the server's own log timestamps are from the test's clock."""
    first = json_lines(server.stderr())[0]
    return datetime.fromisoformat(first["time"]).timestamp() - started


def test_replicas_skewed_90_s_either_way_stop_no_live_run_and_catch_a_dead_one(
    fleet: Fleet, store: Store
) -> None:
    library = faketime_library()
    replicas: list[ServerProcess] = []
    for offset in (SKEW, -SKEW):
        started = time.time()
        replica = skewed(fleet, library, offset)
        # The seam took: the process's wall clock is off by the offset (start-up is seconds).
        assert abs(logged_skew(replica, started) - offset) < 30, replica.stderr()[:500]
        replicas.append(replica)
    ahead, behind = replicas

    # Runs created through one replica, worked through the other.
    run_ids = [fleet.create_run(replicas[i % 2].address, f"t{i}", jobs=200) for i in range(WORKERS)]
    workers = [
        fleet.worker(replicas[(i + 1) % 2].address, f"t{i}", f"w{i}", "--hold", "0.3")
        for i in range(WORKERS)
    ]
    assert [w.run_id() for w in workers] == run_ids

    # Both replicas read the runs as active while their reapers pass every 0.5 s.
    deadline = time.monotonic() + ALIVE_FOR
    with grpc.insecure_channel(ahead.address) as a, grpc.insecure_channel(behind.address) as b:
        stubs = [pb_grpc.RunServiceStub(a), pb_grpc.RunServiceStub(b)]
        while time.monotonic() < deadline:
            for i in range(WORKERS):
                for stub in stubs:
                    active = stub.GetActive(
                        pb.GetActiveRequest(),
                        metadata=[("authorization", f"Bearer {issue('backend', f't{i}')}")],
                        timeout=5,
                    )
                    assert active.run.id == run_ids[i]
            time.sleep(0.2)
    assert [store.run(r).state for r in run_ids] == ["RUNNING"] * WORKERS
    assert store.stale_detections() == 0
    for worker in workers:
        assert worker.process.poll() is None, worker.log.read_text()

    # A worker that dies is caught as usual, whichever skewed reaper gets there first.
    *alive, doomed = workers
    doomed.process.kill()
    killed = time.monotonic()
    doomed.process.wait(timeout=10)
    bound = STALE_AFTER + REAP_INTERVAL + 1.0
    wait_for(lambda: store.run(run_ids[-1]).state != "RUNNING", timeout=bound + 5)
    latency = time.monotonic() - killed
    assert latency <= bound, f"finalized {latency:.2f} s after the kill, bound {bound} s"
    ended = store.run(run_ids[-1])
    assert (ended.state, ended.stop_reason) == ("STOPPED", "HEARTBEAT_TIMEOUT")

    time.sleep(STALE_AFTER)
    assert [store.run(r).state for r in run_ids[:-1]] == ["RUNNING"] * (WORKERS - 1)
    assert store.stale_detections() == 1
    for worker in alive:
        assert worker.process.poll() is None, worker.log.read_text()
        assert worker.lines()[-1]["code"] == "OK"
    print(
        f"skew ±{SKEW:.0f} s: 0 of {WORKERS - 1} live runs stopped over "
        f"{ALIVE_FOR + STALE_AFTER:.0f} s; the dead worker's run ended {latency:.2f} s "
        f"after the kill (bound {bound} s)"
    )
