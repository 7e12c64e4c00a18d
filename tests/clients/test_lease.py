"""The worker's lease against a real server: heartbeats, cancel, partitions, blips.

Worker calls go through a loopback TCP proxy that the test controls; the
backend's calls go straight to the server.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from runsvc.server import Server
from runsvc_client import (
    BackendClient,
    Job,
    JobResult,
    JobSpec,
    Lease,
    LeaseLost,
    RetryPolicy,
    RunState,
    WorkerClient,
)
from tests.clients.conftest import REAP_INTERVAL, address, running_server, token
from tests.support.proxy import TcpProxy
from tests.support.waiting import wait_for

# Short thresholds keep the tests short; the ratios are the production ones.
STALE_AFTER = 6.0
SLACK = 0.5  # scheduling and loopback round trips


def specs(n: int) -> list[JobSpec]:
    return [JobSpec(f"call-{i}") for i in range(n)]


@pytest.fixture
def server(sqlite_url: str, tmp_path: Path) -> Iterator[Server]:
    with running_server(sqlite_url, tmp_path, stale_after=STALE_AFTER) as running:
        yield running


@pytest.fixture
def backend(server: Server) -> Iterator[BackendClient]:
    with BackendClient(address(server), token=token("backend")) as client:
        yield client


@pytest.fixture
def proxy(server: Server) -> Iterator[TcpProxy]:
    with TcpProxy(upstream=("127.0.0.1", server.port)) as running:
        yield running


@pytest.fixture
def worker(proxy: TcpProxy) -> Iterator[WorkerClient]:
    with WorkerClient(proxy.address, token=token("worker", subject="w1"), worker_id="w1") as client:
        yield client


def claim(worker: WorkerClient) -> Lease:
    lease = worker.claim()
    assert lease is not None
    return lease


def listed_state(backend: BackendClient, run_id: str) -> RunState:
    """The run's state without the stale check on read (ListRuns does not finalize)."""
    return next(r.state for r in backend.list_runs() if r.id == run_id)


def test_learns_the_threshold_and_completes_a_run(
    backend: BackendClient, worker: WorkerClient
) -> None:
    run = backend.create_run(specs(7), request_id="r")
    lease = claim(worker)
    assert lease.run_id == run.id and not lease.resumed and lease.lease_epoch == 1
    with lease:
        assert lease.timing is not None
        # Never more than the truth, and only round trips less.
        assert STALE_AFTER - 1.0 < lease.timing.stale_after <= STALE_AFTER
        assert lease.timing.heartbeat_interval == pytest.approx(lease.timing.stale_after / 3)
        assert lease.timing.fence_after == pytest.approx(lease.timing.stale_after * 2 / 3)
        seen: list[Job] = []
        for job in lease.jobs(batch_size=2):
            seen.append(job)
            lease.report([JobResult.completed(job.id)])
        assert len(seen) == 7 and len({j.id for j in seen}) == 7
        finished = lease.finish()
    assert finished.state is RunState.COMPLETED and finished.job_counts.completed == 7
    assert backend.get_run(run.id).state is RunState.COMPLETED
    assert worker.claim() is None


def test_cancel_reaches_a_live_worker_within_one_interval(
    backend: BackendClient, worker: WorkerClient
) -> None:
    run = backend.create_run(specs(3), request_id="r")
    with claim(worker) as lease:
        assert lease.timing is not None
        job = next(lease.jobs(batch_size=1))
        requested = time.monotonic()
        backend.cancel(run.id, reason="user asked")
        # The worker makes no call of its own: only its heartbeat can tell it.
        assert lease.cancel_requested.wait(lease.timing.heartbeat_interval + SLACK)
        latency = time.monotonic() - requested
        assert latency <= lease.timing.heartbeat_interval + SLACK
        assert list(lease.jobs()) == []  # the iterator stops on cancel
        lease.report([JobResult.completed(job.id)])
        assert lease.finish().state is RunState.CANCELLED
    ended = backend.get_run(run.id)
    assert ended.state is RunState.CANCELLED and ended.job_counts.completed == 1


def test_a_partitioned_worker_fences_itself_before_the_server_gives_up(
    backend: BackendClient, worker: WorkerClient, proxy: TcpProxy
) -> None:
    run = backend.create_run(specs(5), request_id="r")
    with claim(worker) as lease:
        assert lease.timing is not None
        jobs = lease.jobs(batch_size=1)
        job = next(jobs)
        proxy.blackhole()
        partitioned = time.monotonic()
        assert lease.lost.wait(STALE_AFTER)
        fenced = time.monotonic()
        # Fenced by the budget counted from the last acknowledged send, which
        # came before the partition: at most fence_after after it began.
        assert fenced - partitioned <= lease.timing.fence_after + SLACK
        assert "fencing budget" in lease.lost_reason
        assert list(jobs) == []
        # The server has not given the run away yet: the worker stopped first.
        assert listed_state(backend, run.id) is RunState.RUNNING
        wait_for(
            lambda: listed_state(backend, run.id) is RunState.STOPPED,
            timeout=STALE_AFTER + REAP_INTERVAL + 2,
        )
        proxy.restore()
        with pytest.raises(LeaseLost):
            lease.heartbeat()  # refused locally: a lost lease does not dial
        with pytest.raises(LeaseLost) as late:
            lease.report([JobResult.completed(job.id)])
        assert isinstance(late.value.__cause__, grpc.RpcError)  # the server refused it
        assert late.value.reason == "LEASE_LOST"
        with pytest.raises(LeaseLost):
            lease.finish()
    stopped = backend.get_run(run.id)
    assert stopped.state is RunState.STOPPED and stopped.stop_reason == "HEARTBEAT_TIMEOUT"
    assert stopped.job_counts.completed == 1  # the late result is kept, not dropped


def test_a_three_second_blip_does_not_lose_the_run(sqlite_url: str, tmp_path: Path) -> None:
    # A blip of b seconds is survived when b < fence_after - heartbeat_interval
    # (a third of the threshold): here 12 s, so 4 s > 3 s.
    with (
        running_server(sqlite_url, tmp_path, stale_after=12.0) as server,
        TcpProxy(upstream=("127.0.0.1", server.port)) as proxy,
        BackendClient(address(server), token=token("backend")) as backend,
        WorkerClient(proxy.address, token=token("worker", subject="w1"), worker_id="w1") as worker,
    ):
        run = backend.create_run(specs(20), request_id="r")
        done = 0
        with claim(worker) as lease:
            blip = threading.Timer(3.0, proxy.restore)
            for job in lease.jobs(batch_size=2):
                if done == 3:
                    proxy.blackhole()
                    blip.start()
                time.sleep(0.15)
                lease.report([JobResult.completed(job.id)])
                done += 1
            blip.join()
            assert not lease.lost.is_set(), lease.lost_reason
            assert lease.finish().state is RunState.COMPLETED
        assert done == 20
        assert backend.get_run(run.id).job_counts.completed == 20


class LoseFirstAnswer(grpc.UnaryUnaryClientInterceptor):
    """Lets the first call of ``method`` reach the server and drops its answer: the client
    sees UNAVAILABLE, as when the replica that committed the call died before replying."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.dropped = 0

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        call = continuation(details, request)
        if details.method != self.method or self.dropped:
            return call
        call.result()  # the server answered: the call committed
        self.dropped += 1
        return _unavailable(details.method, request)


def _unavailable(method: str, request: Any) -> grpc.RpcError:
    """A real UNAVAILABLE error: the same call to a port bound but not listening."""
    with socket.socket() as refusing:
        refusing.bind(("127.0.0.1", 0))
        port = refusing.getsockname()[1]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(method, request_serializer=type(request).SerializeToString)
            try:
                call(request, timeout=5)
            except grpc.RpcError as error:
                assert isinstance(error, grpc.Call)
                assert error.code() is grpc.StatusCode.UNAVAILABLE
                return error
    raise AssertionError("a port that is not listening answered")


@pytest.mark.parametrize("attempts", [4, 1], ids=["retried-by-the-call", "retried-by-jobs"])
def test_the_jobs_of_a_lost_acquire_answer_are_handed_out_by_its_retry(
    server: Server, backend: BackendClient, attempts: int
) -> None:
    # The server's three slots: the jobs the lost answer carried hold them all until
    # reported, so a retry that took other jobs would find none free, ever.
    run = backend.create_run(specs(5), request_id="r")
    lost = LoseFirstAnswer("/runsvc.v1.RunService/AcquireJobs")
    channel = grpc.intercept_channel(grpc.insecure_channel(address(server)), lost)
    # Only if the retry never gets a job: a cancel ends the loop, and the test fails.
    stuck = threading.Timer(30.0, backend.cancel, args=(run.id,))
    stuck.start()
    try:
        worker = WorkerClient(
            channel,
            token=token("worker", subject="w1"),
            worker_id="w1",
            retry=RetryPolicy(attempts=attempts),
        )
        with claim(worker) as lease:
            seen: list[Job] = []
            for job in lease.jobs(batch_size=3):
                seen.append(job)
                lease.report([JobResult.completed(job.id)])
            assert lease.finish().state is RunState.COMPLETED
    finally:
        stuck.cancel()
        channel.close()
    assert lost.dropped == 1
    assert len(seen) == 5 and len({j.id for j in seen}) == 5
    assert backend.get_run(run.id).job_counts.completed == 5
