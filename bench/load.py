"""Closed-loop load on one RPC from a separate process: ``python -m bench.load``.

Keeps ``--concurrency`` calls in flight with ``grpc.aio`` for ``--duration``
seconds after a warm-up, then prints one JSON object: calls, errors,
throughput, p50/p99 latency, and the server's CPU seconds per call (read
from ``/proc/PID/stat`` around the measured window, summed over the processes
of ``runsvc serve --workers N``). ``--channels`` opens that many connections.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runsvc import tokens
from runsvc_client.v1 import run_service_pb2 as pb
from runsvc_client.v1 import run_service_pb2_grpc as pb_grpc

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants: the processes of ``runsvc serve --workers N``."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in task.read_text().split():
            found += process_tree(int(child))
    return found


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def database_cpu_seconds() -> float | None:
    """CPU seconds of every ``postgres`` process on this host (its backends, WAL writer,
    checkpointer, autovacuum): what the database spent, when it runs here. None when no
    PostgreSQL process is visible (a remote database)."""
    total, seen = 0.0, False
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() != "postgres":
                continue
            total += cpu_seconds(int(comm.parent.name))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # gone meanwhile
        seen = True
    return total if seen else None


def tree_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds of each process of the server, by pid (one gone meanwhile is left out)."""
    seconds = {}
    for one in process_tree(pid):
        try:
            seconds[one] = cpu_seconds(one)
        except FileNotFoundError:
            continue
    return seconds


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


Call = Callable[[int], Awaitable[Any]]


Metadata = list[tuple[str, str]]


def credentials(
    targets: list[dict[str, Any]], secret: str
) -> tuple[list[Metadata], list[Metadata]]:
    """A worker's and a backend's token for each target, issued once for every channel."""

    def auth(role: str, tenant: str | None, subject: str | None = None) -> Metadata:
        token = tokens.issue(secret, role=role, tenant_id=tenant, ttl_seconds=3600, subject=subject)
        return [("authorization", f"Bearer {token}")]

    return (
        [auth("worker", t["tenant_id"], t.get("worker_id")) for t in targets],
        [auth("backend", t["tenant_id"]) for t in targets],
    )


def make_call(
    rpc: str,
    channel: grpc.aio.Channel,
    targets: list[dict[str, Any]],
    worker_md: list[Metadata],
    backend_md: list[Metadata],
) -> Call:
    stub = pb_grpc.RunServiceStub(channel)

    if rpc == "Check":
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="")
        return lambda i: health.Check(request)
    if rpc == "Heartbeat":
        requests = [
            pb.HeartbeatRequest(run_id=t["run_id"], lease_epoch=t["lease_epoch"]) for t in targets
        ]
        return lambda i: stub.Heartbeat(requests[i], metadata=worker_md[i])
    if rpc == "GetActive":
        request = pb.GetActiveRequest()
        return lambda i: stub.GetActive(request, metadata=backend_md[i])
    if rpc == "GetRun":
        requests_get = [pb.GetRunRequest(run_id=t["run_id"]) for t in targets]
        return lambda i: stub.GetRun(requests_get[i], metadata=backend_md[i])
    raise SystemExit(f"unknown rpc {rpc}")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    targets: list[dict[str, Any]] = (
        json.loads(Path(args.targets).read_text())
        if args.targets
        else [{"tenant_id": "t", "run_id": "", "lease_epoch": 1}]
    )
    latencies: list[float] = []
    errors: dict[str, int] = {}
    # The first message of each status: what a refusal says is half of understanding it.
    error_samples: dict[str, str] = {}
    measuring = False
    stop_at = 0.0
    # Each channel its own connection: with `serve --workers N` the kernel spreads
    # connections, not calls, over the processes.
    channels = [
        grpc.aio.insecure_channel(args.address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(args.channels)
    ]
    try:
        worker_md, backend_md = credentials(targets, args.secret)
        calls_by_channel = [
            make_call(args.rpc, c, targets, worker_md, backend_md) for c in channels
        ]

        async def loop(slot: int) -> None:
            index = slot % len(targets)
            call = calls_by_channel[slot % len(calls_by_channel)]
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                try:
                    await call(index)
                except grpc.aio.AioRpcError as error:
                    if measuring:
                        errors[error.code().name] = errors.get(error.code().name, 0) + 1
                        error_samples.setdefault(error.code().name, str(error.details()))
                    continue
                if measuring:
                    latencies.append(time.perf_counter() - started)

        stop_at = time.monotonic() + args.warmup + args.duration
        tasks = [asyncio.create_task(loop(i)) for i in range(args.concurrency)]
        await asyncio.sleep(args.warmup)
        measuring = True
        cpu_before, wall_before = tree_cpu_seconds(args.server_pid), time.monotonic()
        database_before = database_cpu_seconds()
        await asyncio.sleep(args.duration)
        measuring = False
        cpu_after, wall_after = tree_cpu_seconds(args.server_pid), time.monotonic()
        database_after = database_cpu_seconds()
        await asyncio.gather(*tasks)
    finally:
        for channel in channels:
            await channel.close()
    latencies.sort()
    cpu_by_process = {
        pid: cpu_after[pid] - cpu_before.get(pid, 0.0)
        for pid in cpu_after
        if pid != args.server_pid
    }
    cpu = sum(cpu_after.values()) - sum(cpu_before.get(pid, 0.0) for pid in cpu_after)
    calls = len(latencies)
    wall = wall_after - wall_before
    return {
        "rpc": args.rpc,
        "concurrency": args.concurrency,
        "calls": calls,
        "errors": errors,
        "error_samples": error_samples,
        "throughput": calls / wall,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "server_cpu_us_per_call": cpu / max(calls, 1) * 1e6,
        "database_cpu_us_per_call": (
            (database_after - database_before) / max(calls, 1) * 1e6
            if database_before is not None and database_after is not None
            else None
        ),
        "channels": args.channels,
        # With `serve --workers N`: CPU seconds of each process (how evenly the load spread).
        "server_cpu_seconds_by_process": sorted(cpu_by_process.values(), reverse=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", required=True)
    parser.add_argument("--rpc", required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--channels", type=int, default=1, help="connections to the server")
    parser.add_argument("--targets", help="JSON file: [{tenant_id, run_id, lease_epoch}]")
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--secret", default=os.environ.get("RUNSVC_JWT_SECRET", ""))
    args = parser.parse_args()
    random.seed(1)
    json.dump(asyncio.run(run(args)), sys.stdout)


if __name__ == "__main__":
    main()
