"""``make bench``: runsvc on PostgreSQL, measured side by side in one run.

Starts a real server process on a fresh database and, beside it, a bare
reference server (``bench.bare``: a sync gRPC server with one empty handler,
the ceiling of Python gRPC here), loads history, and drives each path from a
separate load process (``bench.load``): the bare server's Check, runsvc's
health Check (through runsvc's interceptors), Heartbeat at 16/64/256 in
flight, GetActive and GetRun. The paths are measured in interleaved rounds
(every path once per round, ``--rounds`` rounds) and each is reported by its
median round, as a ratio to the bare server's median: a drift of the machine
during the run touches every path alike. Then a worker's ClaimRun +
AcquireJobs + ReportJobs over 1,000 jobs, reaper passes over 10,000 running
runs, and Check and Heartbeat at 64 in
flight again on ``runsvc serve --workers 1`` and ``--workers 2`` (16
connections each: the kernel spreads connections over the processes), side
by side. Results: a table on stdout and JSON in ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from bench.load import process_tree
from runsvc import tokens
from runsvc.server import build
from runsvc.settings import Settings
from runsvc.store.schema import metadata
from runsvc_client.v1 import run_service_pb2 as pb
from runsvc_client.v1 import run_service_pb2_grpc as pb_grpc

RESULTS = Path(__file__).parent / "results"
SECRET = "bench-secret-long-enough-for-an-hs256-key"
LIVE_RUNS = 256


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def create_database(base_url: str) -> str:
    base = make_url(base_url)
    name = f"runsvc_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = base.set(database=name).render_as_string(hide_password=False)
    engine = create_engine(url)
    metadata.create_all(engine)
    engine.dispose()
    return url


def drop_database(base_url: str, url: str) -> None:
    admin = create_engine(make_url(base_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))
    admin.dispose()


# Bulk loading is done in SQL: it is set-up, not a path being measured.
HISTORY_SQL = """
INSERT INTO runs (id, tenant_id, request_id, state, cancel_requested, lease_epoch,
                  created_at, started_at, ended_at, updated_at)
SELECT md5('h' || g)::uuid::text, 'live-' || (g % :tenants), 'h-' || g, 'COMPLETED', false, 2,
       now() - interval '30 days' + g * interval '1 second',
       now() - interval '30 days' + g * interval '1 second',
       now() - interval '30 days' + g * interval '1 second' + interval '5 minutes',
       now() - interval '30 days' + g * interval '1 second' + interval '5 minutes'
FROM generate_series(1, :n) AS g
"""

LIVE_SQL = """
INSERT INTO runs (id, tenant_id, request_id, state, cancel_requested, worker_id, lease_epoch,
                  lock_ts, last_heartbeat_at, created_at, started_at, updated_at)
SELECT md5(:prefix || g)::uuid::text, :prefix || g, 'live-' || g, 'RUNNING', false,
       'bench-worker-' || g, 1,
       now() - :age * interval '1 second', now() - :age * interval '1 second',
       now() - interval '1 hour', now() - interval '1 hour', now() - :age * interval '1 second'
FROM generate_series(:first, :last) AS g
"""

LIVE_JOBS_SQL = """
INSERT INTO jobs (id, run_id, tenant_id, seq, external_id, payload, state, late, created_at)
SELECT md5(:prefix || 'j' || g || '-' || s)::uuid::text, md5(:prefix || g)::uuid::text,
       :prefix || g, s,
       'call-' || s, '\\x00'::bytea, 'QUEUED', false, now()
FROM generate_series(:first, :last) AS g, generate_series(1, :jobs) AS s
"""


LIVE_TARGETS_SQL = """
SELECT id, tenant_id, lease_epoch, worker_id FROM runs WHERE state = 'RUNNING' ORDER BY tenant_id
"""


def load(url: str, *, history: int) -> list[dict[str, Any]]:
    engine = create_engine(url)
    with engine.begin() as conn:
        if history:
            conn.execute(text(HISTORY_SQL), {"n": history, "tenants": LIVE_RUNS})
        params = {"prefix": "live-", "first": 0, "last": LIVE_RUNS - 1, "age": 1}
        conn.execute(text(LIVE_SQL), params)
        conn.execute(text(LIVE_JOBS_SQL), {**params, "jobs": 10})
        rows = conn.execute(text(LIVE_TARGETS_SQL)).all()
    # Settle the bulk load before measuring: its dead tuples vacuumed, statistics
    # fresh, its WAL checkpointed, so that autovacuum and a checkpoint triggered
    # by the load do not land inside the measured paths.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM (ANALYZE)"))
        conn.execute(text("CHECKPOINT"))
    engine.dispose()
    return [
        {
            "run_id": r.id,
            "tenant_id": r.tenant_id,
            "lease_epoch": r.lease_epoch,
            "worker_id": r.worker_id,
        }
        for r in rows
    ]


def free_ports(count: int) -> int:
    """A port p with p .. p + count - 1 all free (the metrics of `serve --workers N`)."""
    for _ in range(100):
        base = free_port()
        sockets = [socket.socket() for _ in range(count)]
        try:
            for offset, sock in enumerate(sockets):
                sock.bind(("127.0.0.1", base + offset))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return base
    raise SystemExit(f"no {count} consecutive free ports")


class ServerProcess:
    """``runsvc serve [--workers N]`` in a process of its own, once every process serves."""

    def __init__(
        self,
        url: str,
        workdir: Path,
        *,
        extra_env: dict[str, str],
        workers: int = 1,
        module: str | None = None,
    ) -> None:
        """``module``: serve with ``python -m module --port P`` instead (no metrics port)."""
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.workers = workers
        self.metrics_port = free_ports(workers)
        env = {
            **os.environ,
            "RUNSVC_DATABASE_URL": url,
            "RUNSVC_DATA_DIR": str(workdir),
            "RUNSVC_GRPC_ADDRESS": self.address,
            "RUNSVC_JWT_SECRET": SECRET,
            "RUNSVC_STALE_AFTER_SECONDS": "3600",
            "RUNSVC_STARTUP_CLEANUP_AFTER_SECONDS": "7200",
            "RUNSVC_REAP_INTERVAL_SECONDS": "3600",
            "RUNSVC_LOG_LEVEL": "WARNING",
            "RUNSVC_METRICS_ADDRESS": f"127.0.0.1:{self.metrics_port}",
            # The benchmark measures the paths, not the per-tenant rate limits.
            "RUNSVC_RATE_LIMITS": ",".join(
                f"{name}=1000000:1000000" for name in ("read", "write", "worker", "heartbeat")
            ),
            **extra_env,
        }
        self.log = (workdir / f"{module or 'server'}-{workers}.log").open("w")
        command = (
            [sys.executable, "-m", module, "--port", str(self.port)]
            if module
            else [sys.executable, "-m", "runsvc.cli", "serve", "--workers", str(workers)]
        )
        self.process = subprocess.Popen(
            command, env=env, stderr=self.log, cwd=Path(__file__).parent.parent
        )
        self._wait_serving(metrics=module is None)

    def _wait_serving(self, *, metrics: bool) -> None:
        deadline = time.monotonic() + 30
        # Each process binds its metrics port just before it serves gRPC.
        pending = [self.metrics_port + i for i in range(self.workers)] if metrics else []
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                pending = [port for port in pending if not answers_http(port)]
                try:
                    answer = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING and not pending:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise SystemExit("the server did not start; see its log")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


class BareServer:
    """``bench.bare`` in a process of its own: the reference every path is divided by."""

    workers = 1

    def __init__(self, workdir: Path) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self.log = (workdir / "bare.log").open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.bare", "--port", self.address.rsplit(":", 1)[1]],
            stderr=self.log,
            cwd=Path(__file__).parent.parent,
        )
        deadline = time.monotonic() + 30
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                try:
                    health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    return
                except grpc.RpcError:
                    time.sleep(0.2)
        raise SystemExit("the bare reference server did not start; see bare.log")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


def answers_http(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2):
            return True
    except OSError:
        return False


def drive(
    server: ServerProcess | BareServer,
    rpc: str,
    concurrency: int,
    targets: Path,
    duration: float,
    *,
    channels: int = 1,
) -> dict[str, Any]:
    output = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.load",
            "--address",
            server.address,
            "--rpc",
            rpc,
            "--concurrency",
            str(concurrency),
            "--duration",
            str(duration),
            "--targets",
            str(targets),
            "--server-pid",
            str(server.process.pid),
            "--secret",
            SECRET,
            "--channels",
            str(channels),
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    return json.loads(output.stdout)


def worker_flow(server: ServerProcess, jobs: int) -> dict[str, Any]:
    """One worker takes a run of ``jobs`` jobs through ClaimRun, AcquireJobs and ReportJobs."""
    backend = [
        (
            "authorization",
            "Bearer " + tokens.issue(SECRET, role="backend", tenant_id="flow", ttl_seconds=600),
        )
    ]
    worker = [
        (
            "authorization",
            "Bearer "
            + tokens.issue(
                SECRET, role="worker", tenant_id="flow", ttl_seconds=600, subject="flow-worker"
            ),
        )
    ]
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RunServiceStub(channel)
        specs = [pb.JobSpec(external_id=f"c{i}", payload=b"+972500000000") for i in range(jobs)]
        stub.CreateRun(pb.CreateRunRequest(request_id="flow", jobs=specs), metadata=backend)
        calls = 0
        started = time.perf_counter()
        claim = stub.ClaimRun(pb.ClaimRunRequest(worker_id="flow-worker"), metadata=worker)
        calls += 1
        done = 0
        while True:
            got = stub.AcquireJobs(
                pb.AcquireJobsRequest(
                    run_id=claim.run.id, lease_epoch=claim.lease_epoch, max_jobs=100
                ),
                metadata=worker,
            )
            calls += 1
            if not got.jobs:
                break
            stub.ReportJobs(
                pb.ReportJobsRequest(
                    run_id=claim.run.id,
                    lease_epoch=claim.lease_epoch,
                    results=[
                        pb.JobResult(job_id=j.id, outcome=pb.JOB_OUTCOME_COMPLETED)
                        for j in got.jobs
                    ],
                ),
                metadata=worker,
            )
            calls += 1
            done += len(got.jobs)
        elapsed = time.perf_counter() - started
    return {"jobs": done, "calls": calls, "seconds": elapsed, "jobs_per_second": done / elapsed}


RETIRE_LIVE_SQL = """
UPDATE runs SET state = 'COMPLETED', ended_at = now(), worker_id = NULL, lock_ts = NULL
WHERE state IN ('PENDING', 'RUNNING')
"""


def reaper_passes(url: str, workdir: Path, *, running: int, stale: int) -> dict[str, Any]:
    engine = create_engine(url)
    with engine.begin() as conn:
        # The measured runs join the history, which stays: a pass must not care.
        conn.execute(text(RETIRE_LIVE_SQL))
        fresh = {"prefix": "reap-", "first": 0, "last": running - stale - 1, "age": 1}
        old = {"prefix": "reap-", "first": running - stale, "last": running - 1, "age": 3600}
        conn.execute(text(LIVE_SQL), fresh)
        conn.execute(text(LIVE_SQL), old)
        conn.execute(text("ANALYZE"))
    engine.dispose()
    settings = Settings(data_dir=workdir, database_url=url, stale_after_seconds=30)
    components = build(settings)
    # As `runsvc reap --once` does: a process that has just started has seen no heartbeat
    # fail to arrive, so it judges nothing until vouched for.
    components.db.trust.vouch()
    try:
        started = time.perf_counter()
        first = components.reaper.pass_once()
        busy = time.perf_counter() - started
        started = time.perf_counter()
        second = components.reaper.pass_once()
        idle = time.perf_counter() - started
    finally:
        components.service.close()
        components.db.dispose()
    return {
        "running": running,
        "stale": stale,
        "ended": first.total,
        "pass_seconds": busy,
        "idle_pass_seconds": idle,
        "idle_ended": second.total,
    }


def machine() -> dict[str, Any]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def workers_table(section: dict[str, Any]) -> list[str]:
    one, many = section["workers"]
    lines = [
        f"`serve --workers {many}` against `--workers {one}` "
        f"({section['channels']} connections each):",
        "",
        f"| path | --workers {one} calls/s | --workers {many} calls/s | change | "
        f"p99 ms ({one} / {many}) | server CPU s by process (--workers {many}) |",
        "|---|---|---|---|---|---|",
    ]
    for rpc, concurrency in WORKERS_PLAN:
        base = section["paths"][f"{rpc}(workers={one})@{concurrency}"]
        other = section["paths"][f"{rpc}(workers={many})@{concurrency}"]
        split = " / ".join(f"{s:.1f}" for s in other["server_cpu_seconds_by_process"])
        lines.append(
            f"| {rpc}@{concurrency} | {base['throughput']:,.0f} | {other['throughput']:,.0f} | "
            f"{other['throughput'] / base['throughput'] - 1:+.0%} | "
            f"{base['p99_ms']:.1f} / {other['p99_ms']:.1f} | {split} |"
        )
    return lines


def table(result: dict[str, Any]) -> str:
    bare = result["paths"][BARE]["throughput"]
    lines = [
        "| path | calls/s (median) | rounds calls/s | p50 ms | p99 ms | errors "
        "| server CPU µs/call | ratio to bare |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["paths"].items():
        rounds = " / ".join(f"{t:,.0f}" for t in row.get("rounds_throughput", []))
        errors = sum(row["errors"].values())
        lines.append(
            f"| {name} | {row['throughput']:,.0f} | {rounds} | {row['p50_ms']:.1f} | "
            f"{row['p99_ms']:.1f} | {errors:,} | {row['server_cpu_us_per_call']:,.0f} | "
            f"{row['throughput'] / bare:.2f} |"
        )
    naive = result["paths"].get("Heartbeat(naive)@64")
    if naive:
        grouped = result["paths"]["Heartbeat@64"]["throughput"]
        lines.append(
            f"\ngroup commit / naive at 64 in flight: {grouped / naive['throughput']:.2f}x"
        )
    if "soak" in result:
        soaked = result["soak"]
        lines.append(
            f"soak: {soaked['seconds']:.0f} s of Heartbeat@64 at {soaked['throughput']:,.0f}/s; "
            f"RSS after warm-up changed {soaked['rss_settled_change'] * 100:+.1f}%"
        )
    if "workers_comparison" in result:
        lines += ["", *workers_table(result["workers_comparison"])]
    flow = result["worker_flow"]
    reap = result["reaper"]
    lines += [
        "",
        f"worker flow: {flow['jobs']} jobs in {flow['seconds']:.2f} s "
        f"({flow['jobs_per_second']:,.0f} jobs/s, {flow['calls']} calls)",
        f"reaper: {reap['ended']} of {reap['running']} running runs ended in "
        f"{reap['pass_seconds'] * 1000:.0f} ms; "
        f"a pass with nothing stale: {reap['idle_pass_seconds'] * 1000:.1f} ms",
    ]
    return "\n".join(lines)


def rss_kib(pid: int) -> int:
    """Resident memory of the server, summed over the processes of `serve --workers N`."""
    total = 0
    for one in process_tree(pid):
        for line in Path(f"/proc/{one}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def load_average() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


# The bare reference server's path; every other path is divided by it.
BARE = "bare Check@64"
PLAN = [
    ("Check", 64),
    ("Heartbeat", 16),
    ("Heartbeat", 64),
    ("Heartbeat", 256),
    ("GetActive", 64),
    ("GetRun", 64),
]
NAIVE_PLAN = [("Heartbeat", 64)]
WORKERS_PLAN = [("Check", 64), ("Heartbeat", 64)]
# Connections per measurement when several processes serve: the kernel spreads
# connections over them, so one connection would load one process only.
SPREAD_CHANNELS = 16


def measure_paths(
    into: dict[str, Any],
    server: ServerProcess | BareServer,
    plan: list[tuple[str, int]],
    targets_file: Path,
    duration: float,
    *,
    suffix: str = "",
    channels: int = 1,
) -> None:
    for rpc, concurrency in plan:
        name = f"{rpc}{suffix}@{concurrency}"
        into[name] = measure_one(server, rpc, concurrency, targets_file, duration, channels)
        print(f"measured {name} on --workers {server.workers}", file=sys.stderr)


def measure_one(
    server: ServerProcess | BareServer,
    rpc: str,
    concurrency: int,
    targets_file: Path,
    duration: float,
    channels: int,
) -> dict[str, Any]:
    before = rss_kib(server.process.pid)
    row = drive(server, rpc, concurrency, targets_file, duration, channels=channels)
    row["server_rss_kib"] = [before, rss_kib(server.process.pid)]
    row["load_average"] = load_average()
    row["server_workers"] = server.workers
    return row


def measure_rounds(
    into: dict[str, Any],
    servers: list[tuple[str, ServerProcess | BareServer, list[tuple[str, int]]]],
    targets_file: Path,
    duration: float,
    *,
    rounds: int,
    channels: int,
) -> None:
    """Every path once per round, rounds interleaved; each path kept as its median round.

    ``servers``: (name prefix, server, plan) in the order measured within a round.
    """
    measured: dict[str, list[dict[str, Any]]] = {}
    for number in range(rounds):
        for prefix, server, plan in servers:
            for rpc, concurrency in plan:
                name = f"{prefix}{rpc}@{concurrency}"
                row = measure_one(server, rpc, concurrency, targets_file, duration, channels)
                measured.setdefault(name, []).append(row)
                print(f"round {number + 1}/{rounds}: measured {name}", file=sys.stderr)
    for name, rows in measured.items():
        ordered = sorted(rows, key=lambda row: row["throughput"])
        median = dict(ordered[len(ordered) // 2])
        median["rounds_throughput"] = [row["throughput"] for row in rows]
        median["errors"] = {
            code: sum(row["errors"].get(code, 0) for row in rows)
            for code in sorted({code for row in rows for code in row["errors"]})
        }
        median["error_samples"] = {
            code: text for row in rows for code, text in row.get("error_samples", {}).items()
        }
        into[name] = median


def compare_workers(
    url: str, workdir: Path, targets_file: Path, duration: float, workers: int
) -> dict[str, Any]:
    """Check and Heartbeat at 64 in flight on `serve --workers 1` and `--workers N`, alike."""
    section: dict[str, Any] = {"channels": SPREAD_CHANNELS, "workers": [1, workers], "paths": {}}
    for count in (1, workers):
        server = ServerProcess(url, workdir, extra_env={}, workers=count)
        try:
            measure_paths(
                section["paths"],
                server,
                WORKERS_PLAN,
                targets_file,
                duration,
                suffix=f"(workers={count})",
                channels=SPREAD_CHANNELS,
            )
        finally:
            server.stop()
    return section


def soak(server: ServerProcess, targets_file: Path, seconds: float) -> dict[str, Any]:
    """Heartbeat@64 for ``seconds``, the server's RSS sampled every 10 s meanwhile."""
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    started = time.monotonic()

    def sample() -> None:
        while not stop.wait(10):
            samples.append((round(time.monotonic() - started), rss_kib(server.process.pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        row = drive(server, "Heartbeat", 64, targets_file, seconds)
    finally:
        stop.set()
        sampler.join()
    kib = [k for _, k in samples]
    # The first minute is warm-up (caches, pools); flat means the rest stays put.
    settled = [k for t, k in samples if t >= 60] or kib
    return {
        **row,
        "seconds": seconds,
        "rss_samples": samples,
        "rss_settled_change": (settled[-1] - settled[0]) / settled[0] if settled else None,
    }


def measure(
    database_url: str,
    *,
    history: int,
    duration: float,
    naive: bool,
    soak_seconds: float = 0,
    command: str = "",
    workers: int = 1,
    compare_with_workers: int = 0,
    rounds: int = 3,
) -> dict[str, Any]:
    """One full run on a fresh database; the result as written to JSON.

    ``workers``: the server is `runsvc serve --workers N` (then every path is driven over
    several connections). ``compare_with_workers``: also Check and Heartbeat at 64 in
    flight on `--workers 1` and on that many, side by side (0: not).
    """
    channels = 1 if workers == 1 else SPREAD_CHANNELS
    url = create_database(database_url)
    result: dict[str, Any] = {
        "command": command,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average_at_start": load_average(),
        "history_runs": history,
        "server_workers": workers,
        "channels": channels,
        "rounds": rounds,
        "paths": {},
    }
    try:
        with tempfile.TemporaryDirectory() as scratch:
            workdir = Path(scratch)
            started = time.perf_counter()
            targets = load(url, history=history)
            result["load_seconds"] = time.perf_counter() - started
            targets_file = workdir / "targets.json"
            targets_file.write_text(json.dumps(targets))
            bare = BareServer(workdir)
            server = ServerProcess(url, workdir, extra_env={}, workers=workers)
            # The heartbeat path on grpc.aio, on the same database, in the same rounds.
            aio = ServerProcess(url, workdir, extra_env={}, module="bench.aio_heartbeat")
            try:
                measure_rounds(
                    result["paths"],
                    [
                        ("bare ", bare, [("Check", 64)]),
                        ("", server, PLAN),
                        ("aio ", aio, [("Heartbeat", 64), ("Check", 64)]),
                    ],
                    targets_file,
                    duration,
                    rounds=rounds,
                    channels=channels,
                )
                result["worker_flow"] = worker_flow(server, 1000)
                if soak_seconds:
                    result["soak"] = soak(server, targets_file, soak_seconds)
            finally:
                aio.stop()
                server.stop()
                bare.stop()
            if naive:
                # The same server with batches of one (one UPDATE and one commit per
                # heartbeat): what group commit buys.
                naive_server = ServerProcess(
                    url,
                    workdir,
                    extra_env={"RUNSVC_HEARTBEAT_BATCH_MAX": "1"},
                    workers=workers,
                )
                try:
                    measure_paths(
                        result["paths"],
                        naive_server,
                        NAIVE_PLAN,
                        targets_file,
                        duration,
                        suffix="(naive)",
                        channels=channels,
                    )
                finally:
                    naive_server.stop()
            if compare_with_workers > 1:
                result["workers_comparison"] = compare_workers(
                    url, workdir, targets_file, duration, compare_with_workers
                )
            result["reaper"] = reaper_passes(url, workdir, running=10_000, stale=1_000)
    finally:
        drop_database(database_url, url)
    return result


def default_database_url() -> str:
    return os.environ.get(
        "RUNSVC_BENCH_DATABASE_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", default=default_database_url())
    parser.add_argument("--history", type=int, default=10_000, help="historical runs to load")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument(
        "--naive",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure Heartbeat with group commit off (one UPDATE per call)",
    )
    parser.add_argument(
        "--soak", type=float, default=0, help="seconds of Heartbeat@64 with RSS sampled (0: none)"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="serve with `runsvc serve --workers N` (default 1)"
    )
    parser.add_argument(
        "--compare-workers",
        type=int,
        default=2,
        help="also Check and Heartbeat@64 on --workers 1 against --workers N (0: skip)",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds; each path keeps its median"
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "latest.json")
    args = parser.parse_args()
    # Stopped by a signal, the run still stops its servers and drops its database (the
    # ``finally`` blocks) rather than leaving them running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    result = measure(
        args.database_url,
        history=args.history,
        duration=args.duration,
        naive=args.naive,
        soak_seconds=args.soak,
        command=" ".join(["python -m bench.run", *sys.argv[1:]]),
        workers=args.workers,
        compare_with_workers=args.compare_workers,
        rounds=args.rounds,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
