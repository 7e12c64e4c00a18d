"""A bare worker process for the fault tests: one JSON line per call, on stdout.

It claims a run, then loops: heartbeat, take a job, hold it ``--hold``
seconds, report it. It never fences itself: an UNAVAILABLE call is retried
at the next tick, so that what the server decides (not what the worker
guesses) is under test. It exits on LEASE_LOST, or when it has no run.

Its channel retries a lost connection at least every second: gRPC's default
backoff grows to two minutes, so after a long outage a worker left to it may
first reach the restarted server only after the stale threshold has passed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from runsvc_client.v1 import run_service_pb2 as pb
from runsvc_client.v1 import run_service_pb2_grpc as pb_grpc

RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.min_reconnect_backoff_ms", 1000),
]


def reason_of(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:
        return ""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


def say(call: str, code: str, reason: str = "", **extra: object) -> None:
    print(json.dumps({"call": call, "code": code, "reason": reason, "t": time.time(), **extra}))
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--tick", type=float, default=0.2)
    parser.add_argument("--hold", type=float, default=0.0)
    parser.add_argument("--max-jobs", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--lifetime", type=float, default=120.0)
    args = parser.parse_args()
    metadata = [("authorization", f"Bearer {args.token}")]
    end = time.monotonic() + args.lifetime
    with grpc.insecure_channel(args.address, options=RECONNECT) as channel:
        stub = pb_grpc.RunServiceStub(channel)
        claim = None
        while claim is None and time.monotonic() < end:
            try:
                claim = stub.ClaimRun(
                    pb.ClaimRunRequest(worker_id=args.worker_id),
                    metadata=metadata,
                    timeout=args.timeout,
                )
            except grpc.RpcError as error:
                say("ClaimRun", error.code().name, reason_of(error))
                time.sleep(args.tick)
        if claim is None or not claim.HasField("run"):
            say("ClaimRun", "NO_RUN")
            return 2
        run_id, epoch = claim.run.id, claim.lease_epoch
        say("ClaimRun", "OK", run_id=run_id, epoch=epoch)
        held: list[tuple[str, float]] = []
        while time.monotonic() < end:
            calls: list[tuple[str, object]] = [
                ("Heartbeat", pb.HeartbeatRequest(run_id=run_id, lease_epoch=epoch))
            ]
            due = [job for job, at in held if time.monotonic() - at >= args.hold]
            if due:
                results = [
                    pb.JobResult(job_id=job, outcome=pb.JOB_OUTCOME_COMPLETED) for job in due
                ]
                calls.append(
                    (
                        "ReportJobs",
                        pb.ReportJobsRequest(run_id=run_id, lease_epoch=epoch, results=results),
                    )
                )
            if not held:
                calls.append(
                    (
                        "AcquireJobs",
                        pb.AcquireJobsRequest(
                            run_id=run_id, lease_epoch=epoch, max_jobs=args.max_jobs
                        ),
                    )
                )
            for name, request in calls:
                try:
                    reply = getattr(stub, name)(request, metadata=metadata, timeout=args.timeout)
                except grpc.RpcError as error:
                    reason = reason_of(error)
                    say(name, error.code().name, reason)
                    if reason == "LEASE_LOST":
                        return 3
                    continue
                if name == "AcquireJobs":
                    held = [(job.id, time.monotonic()) for job in reply.jobs]
                    say(name, "OK", jobs=[job.id for job in reply.jobs])
                elif name == "ReportJobs":
                    held = [(job, at) for job, at in held if job not in due]
                    say(name, "OK", jobs=due)
                else:
                    say(name, "OK")
            time.sleep(args.tick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
