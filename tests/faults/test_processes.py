"""Workers and servers killed, paused and restarted for real; the truth about "active" holds."""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest

from runsvc_client.v1 import run_service_pb2 as pb
from runsvc_client.v1 import run_service_pb2_grpc as pb_grpc
from tests.faults.conftest import (
    FULL,
    REAP_INTERVAL,
    STALE_AFTER,
    Fleet,
    Store,
    issue,
)
from tests.support.waiting import wait_for

pytestmark = pytest.mark.postgres

REPEATS = 20 if FULL else 1


@pytest.mark.parametrize("trial", range(REPEATS))
def test_a_killed_worker_is_finalized_within_the_bound(
    fleet: Fleet, store: Store, trial: int
) -> None:
    server = fleet.server()
    run_id = fleet.create_run(server.address, "t1", jobs=10)
    worker = fleet.worker(server.address, "t1", "w1", "--hold", "30")
    assert worker.run_id() == run_id
    wait_for(lambda: store.job_states(run_id).get("IN_PROGRESS") == 1, timeout=10)

    worker.process.kill()
    killed = time.monotonic()
    worker.process.wait(timeout=10)
    bound = STALE_AFTER + REAP_INTERVAL + 1.0
    wait_for(lambda: store.run(run_id).state != "RUNNING", timeout=bound + 5)
    latency = time.monotonic() - killed
    assert latency <= bound, f"finalized after {latency:.2f} s, bound {bound} s"
    ended = store.run(run_id)
    assert (ended.state, ended.stop_reason) == ("STOPPED", "HEARTBEAT_TIMEOUT")
    assert store.job_states(run_id) == {
        "FAILED:WORKER_LOST": 1,
        "FAILED:HEARTBEAT_TIMEOUT": 9,
    }
    print(f"reaper detection latency: {latency:.3f} s (bound {bound} s)")


@pytest.mark.parametrize("trial", range(REPEATS))
def test_get_active_never_reports_a_dead_workers_run_past_the_threshold(
    fleet: Fleet, store: Store, trial: int
) -> None:
    # The reaper waits an hour here: only the read can notice.
    server = fleet.server(RUNSVC_REAP_INTERVAL_SECONDS="3600")
    run_id = fleet.create_run(server.address, "t1", jobs=10)
    worker = fleet.worker(server.address, "t1", "w1", "--hold", "30")
    assert worker.run_id() == run_id
    wait_for(lambda: store.job_states(run_id).get("IN_PROGRESS") == 1, timeout=10)
    metadata = [("authorization", f"Bearer {issue('backend', 't1')}")]

    worker.process.kill()
    killed = time.monotonic()
    worker.process.wait(timeout=10)
    last_active = 0.0
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RunServiceStub(channel)
        while time.monotonic() - killed < STALE_AFTER + 3.0:
            try:
                stub.GetActive(pb.GetActiveRequest(), metadata=metadata, timeout=5)
                last_active = time.monotonic() - killed
            except grpc.RpcError as error:
                assert error.code() is grpc.StatusCode.NOT_FOUND, error
            time.sleep(0.05)
    assert last_active <= STALE_AFTER + 1.0, f"still active {last_active:.2f} s after the kill"
    ended = store.run(run_id)
    assert (ended.state, ended.stop_reason) == ("STOPPED", "HEARTBEAT_TIMEOUT")
    print(f"GetActive last reported it active {last_active:.3f} s after the kill")


# Full variant: 10 s and 20 s down at a 30 s threshold, scaled down by five (2 s and 4 s at
# 6 s) so that 20 restarts (ten of each) fit in minutes; the fast one is a single 0.5 s restart.
RESTART_STALE = 6.0 if FULL else STALE_AFTER
RESTART_DOWNTIMES = [2.0, 4.0] if FULL else [0.5]
RESTART_TRIALS = 10 if FULL else 1


@pytest.mark.parametrize("trial", range(RESTART_TRIALS))
@pytest.mark.parametrize("downtime", RESTART_DOWNTIMES)
def test_a_server_restart_shorter_than_the_threshold_stops_nothing(
    fleet: Fleet, store: Store, downtime: float, trial: int
) -> None:
    stale = str(RESTART_STALE)
    server = fleet.server(RUNSVC_STALE_AFTER_SECONDS=stale)
    run_ids = [fleet.create_run(server.address, f"t{i}", jobs=50) for i in range(4)]
    workers = [fleet.worker(server.address, f"t{i}", f"w{i}", "--hold", "0.5") for i in range(4)]
    assert sorted(w.run_id() for w in workers) == sorted(run_ids)
    *workers, doomed = workers
    doomed_run = doomed.run_id()
    time.sleep(1.0)

    server.process.kill()
    server.process.wait(timeout=10)
    doomed.process.kill()  # a worker that dies while the server is down is still caught
    time.sleep(downtime)
    # Same address: the workers keep retrying it. Start-up itself takes a while.
    fleet.server(address=server.address, RUNSVC_STALE_AFTER_SECONDS=stale)
    # Well past the threshold since the restart: heartbeats flow again.
    time.sleep(float(stale) + 3 * REAP_INTERVAL + 1.0)

    assert [store.run(w.run_id()).state for w in workers] == ["RUNNING"] * 3
    assert store.run(doomed_run).state == "STOPPED"
    assert store.stale_detections() == 1  # the dead worker's run only
    for worker in workers:
        assert worker.process.poll() is None, worker.log.read_text()
        beats = [x for x in worker.lines() if x["call"] == "Heartbeat"]
        assert any(x["code"] == "UNAVAILABLE" for x in beats)  # it did see the outage
        assert beats[-1]["code"] == "OK"


def test_a_paused_worker_is_refused_on_every_write_once_it_wakes(
    fleet: Fleet, store: Store
) -> None:
    server = fleet.server()
    run_id = fleet.create_run(server.address, "t1", jobs=10)
    zombie = fleet.worker(server.address, "t1", "w1", "--hold", "1.0")
    assert zombie.run_id() == run_id
    wait_for(lambda: store.job_states(run_id).get("IN_PROGRESS") == 1, timeout=10)

    os.kill(zombie.process.pid, signal.SIGSTOP)
    paused_at = time.time()
    try:
        wait_for(
            lambda: store.run(run_id).state != "RUNNING",
            timeout=STALE_AFTER + REAP_INTERVAL + 3.0,
        )
    finally:
        os.kill(zombie.process.pid, signal.SIGCONT)
    assert store.run(run_id).state == "STOPPED"
    # The zombie stops at its first refused write; it wrote nothing after the pause.
    assert zombie.process.wait(timeout=10) == 3
    after = [x for x in zombie.lines() if x["t"] > paused_at]
    assert after, zombie.log.read_text()
    assert all(x["reason"] == "LEASE_LOST" for x in after), after
    # Its held job failed as WORKER_LOST; nothing it did after the pause counted as done.
    states = store.job_states(run_id)
    assert states.get("FAILED:WORKER_LOST") == 1
    assert "QUEUED" not in states and "IN_PROGRESS" not in states


def test_workers_fence_themselves_before_a_long_outage_stops_their_runs(
    fleet: Fleet, store: Store
) -> None:
    """The server is down longer than the workers' self-fencing budget (and the threshold)."""
    server = fleet.server()
    run_ids = [fleet.create_run(server.address, f"t{i}", jobs=500) for i in range(2)]
    dialers = [
        fleet.dialer(server.address, f"t{i}", f"d{i}", "--stale-after", str(STALE_AFTER))
        for i in range(2)
    ]
    wait_for(lambda: all("claimed run" in d.log.read_text() for d in dialers), timeout=15)
    time.sleep(0.5)

    server.process.kill()
    server.process.wait(timeout=10)
    fenced: dict[str, float] = {}

    def all_fenced() -> bool:
        for dialer in dialers:
            if dialer.worker_id not in fenced and " lost (" in dialer.log.read_text():
                fenced[dialer.worker_id] = time.monotonic()
        return len(fenced) == len(dialers)

    wait_for(all_fenced, timeout=STALE_AFTER + 2.0)
    time.sleep(STALE_AFTER)  # down for well over the threshold
    fleet.server(address=server.address)
    ended_at: dict[str, float] = {}

    def all_ended() -> bool:
        for run_id in run_ids:
            if run_id not in ended_at and store.run(run_id).state != "RUNNING":
                ended_at[run_id] = time.monotonic()
        return len(ended_at) == len(run_ids)

    wait_for(all_ended, timeout=STALE_AFTER + 3 * REAP_INTERVAL + 10.0)
    assert max(fenced.values()) < min(ended_at.values())
    for run_id in run_ids:
        assert store.run(run_id).state == "STOPPED"
        states = store.job_states(run_id)
        assert "IN_PROGRESS" not in states and "QUEUED" not in states
