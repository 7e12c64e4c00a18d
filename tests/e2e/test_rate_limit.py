"""Per-tenant rate limits: a flooding tenant is throttled; nobody else notices.

Latencies are compared within one run (tenant B alone, B while A floods, B
alone again), never against absolute times. The flood comes from another process, so that
its client-side work does not compete with B's client for this process's GIL.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from runsvc_client.v1 import run_service_pb2 as pb
from runsvc_client.v1 import run_service_pb2_grpc as pb_grpc
from tests.e2e.security_server import es256, plain_channel, serving, settings_for

READ_BUDGET = (12.0, 12.0)  # per second, burst; B's sampling (under 10/s) stays within it
FLOOD_SECONDS = 5.0
FLOOD_RATE = 300.0  # calls per second: 25 times the budget
SAMPLES = 35

FLOODER = r"""
import json, sys, threading, time
import grpc
from runsvc_client.v1 import run_service_pb2 as pb, run_service_pb2_grpc as pb_grpc
port, token, seconds, rate = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
counts = {}
lock = threading.Lock()
def flood(share):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.RunServiceStub(channel)
        meta = [("authorization", f"Bearer {token}")]
        start = time.monotonic(); sent = 0
        while time.monotonic() - start < seconds:
            try:
                stub.GetActive(pb.GetActiveRequest(), metadata=meta, timeout=5)
                code = "OK"
            except grpc.RpcError as error:
                code = error.code().name
            with lock:
                counts[code] = counts.get(code, 0) + 1
            sent += 1
            ahead = sent / share - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
threads = [threading.Thread(target=flood, args=(rate / 2,)) for _ in range(2)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(counts))
"""


HEARTBEAT_EVERY = 0.2  # seconds; the stale threshold is 2 s


class Heartbeats(threading.Thread):
    """Tenant A's worker, heartbeating its run before, during and after the flood."""

    def __init__(
        self, stub: pb_grpc.RunServiceStub, run_id: str, lease: int, metadata: Any
    ) -> None:
        super().__init__(daemon=True)
        self._stub, self._request, self._metadata = (
            stub,
            pb.HeartbeatRequest(run_id=run_id, lease_epoch=lease),
            metadata,
        )
        self.stop = threading.Event()
        self.beats = 0
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.stop.wait(HEARTBEAT_EVERY):
            try:
                self._stub.Heartbeat(self._request, metadata=self._metadata, timeout=5)
                self.beats += 1
            except grpc.RpcError as error:
                self.failures.append(f"{error.code().name}: {error.details()}")


def latencies(
    stub: pb_grpc.RunServiceStub, run_id: str, metadata: list[tuple[str, str]]
) -> list[float]:
    taken = []
    for _ in range(SAMPLES):
        start = time.perf_counter()
        stub.GetRun(pb.GetRunRequest(run_id=run_id), metadata=metadata, timeout=5)
        taken.append(time.perf_counter() - start)
        time.sleep(0.1)
    return taken


def test_a_flooding_tenant_is_throttled_and_others_do_not_notice(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'rate.db'}"
    from runsvc.store import migrate

    migrate.upgrade(db_url)
    config = settings_for(
        db_url, tmp_path, rate_limits={"read": READ_BUDGET}, stale_after_seconds=2.0
    )
    backend_a, worker_a = es256("backend", "A"), es256("worker", "A", subject="wa")
    backend_b = es256("backend", "B")
    with serving(config) as server, plain_channel(server) as channel:
        stub = pb_grpc.RunServiceStub(channel)
        job = [pb.JobSpec(external_id="x")]
        run_a = stub.CreateRun(
            pb.CreateRunRequest(request_id="a", jobs=job), metadata=backend_a
        ).run
        run_b = stub.CreateRun(
            pb.CreateRunRequest(request_id="b", jobs=job), metadata=backend_b
        ).run
        lease = stub.ClaimRun(pb.ClaimRunRequest(worker_id="wa"), metadata=worker_a).lease_epoch

        beating = Heartbeats(stub, run_a.id, lease, worker_a)
        beating.start()
        try:
            baseline = latencies(stub, run_b.id, backend_b)
            token_a = backend_a[0][1].removeprefix("Bearer ")
            flooder = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    FLOODER,
                    str(server.port),
                    token_a,
                    str(FLOOD_SECONDS),
                    str(FLOOD_RATE),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                time.sleep(0.5)  # let the flood spend A's burst
                during = latencies(stub, run_b.id, backend_b)
                output, _ = flooder.communicate(timeout=30)
            finally:
                if flooder.poll() is None:
                    flooder.kill()
                    flooder.wait()
            # B alone again: the machine's own load drifts, so B is judged against
            # the slower of its quiet spells, before and after the flood.
            after = latencies(stub, run_b.id, backend_b)
        finally:
            beating.stop.set()
            beating.join(timeout=10)
        counts = json.loads(output)
        quiet = max(statistics.median(baseline), statistics.median(after))

        # A was throttled: far more refusals than answers, and no more answers than its budget.
        answered = counts.get("OK", 0)
        assert counts.get("RESOURCE_EXHAUSTED", 0) > 5 * answered
        assert answered <= READ_BUDGET[1] + READ_BUDGET[0] * (FLOOD_SECONDS + 1)
        assert set(counts) <= {"OK", "RESOURCE_EXHAUSTED"}
        # B did not notice.
        print(  # the figures, for `pytest -s`
            f"flood {counts}; B median {quiet * 1e3:.2f} ms alone, "
            f"{statistics.median(during) * 1e3:.2f} ms during the flood; {beating.beats} beats"
        )
        # A refusal is cheap but not free (the flood's 300 calls/s still cost this
        # server's CPU and the flooder's, on the same cores): B may slow a little.
        assert statistics.median(during) <= 2 * quiet, (quiet, statistics.median(during))
        # A's heartbeats all went through the whole time, and its run is still running.
        assert beating.failures == []
        assert beating.beats >= FLOOD_SECONDS / HEARTBEAT_EVERY / 2
        time.sleep(1.0)  # A's read budget refills a little
        run = stub.GetRun(pb.GetRunRequest(run_id=run_a.id), metadata=backend_a, timeout=5).run
        assert run.state == pb.RUN_STATE_RUNNING


def test_a_throttled_call_says_when_to_retry(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'retry.db'}"
    from runsvc.store import migrate

    migrate.upgrade(db_url)
    config = settings_for(db_url, tmp_path, rate_limits={"read": (1.0, 2.0)})
    backend = es256("backend", "A")
    with serving(config) as server, plain_channel(server) as channel:
        stub = pb_grpc.RunServiceStub(channel)
        codes = []
        refusal = None
        for _ in range(4):
            try:
                stub.ListRuns(pb.ListRunsRequest(), metadata=backend, timeout=5)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                codes.append(error.code())
                refusal = error
        assert codes[:2] == [grpc.StatusCode.OK] * 2
        assert codes[2:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
        assert refusal is not None
        blob = dict(refusal.trailing_metadata() or ())["grpc-status-details-bin"]
        retry = [
            d
            for d in status_pb2.Status.FromString(blob).details
            if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)
        ]
        info = error_details_pb2.RetryInfo()
        retry[0].Unpack(info)
        assert 0 < info.retry_delay.ToNanoseconds() <= 1_000_000_000
        # Another class of the same tenant has its own budget.
        stub.CreateRun(
            pb.CreateRunRequest(request_id="r", jobs=[pb.JobSpec(external_id="x")]),
            metadata=backend,
        )
