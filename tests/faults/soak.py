"""Soak through outages: ``python -m tests.faults.soak`` (``make soak``).

A real ``runsvc serve`` process on a fresh PostgreSQL database of its own
(reached through ``tests/support/proxy.py``), 1,000 runs (one per tenant)
claimed and heartbeating from this process over ``grpc.aio``, for 10 minutes.
Every minute an outage shorter than the threshold: the server SIGKILLed and
restarted on the same address, then PostgreSQL blackholed behind the proxy,
in turn. A few seconds after each outage one run stops heartbeating on
purpose (its worker "dies"), to measure how long detection takes.

Reported: false stops (a run whose heartbeats never stopped ended, or was
refused its lease: must be 0), detection latency of the killed runs, every
heartbeat's outcome by gRPC code (in and out of outages), the invariant
checker's findings, and the server's RSS at start and at end. JSON goes to
``--output`` and a table is printed; the exit status is 1 when a false stop,
a missed detection or a violation was found.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import Engine, make_url

from bench.run import rss_kib
from runsvc.store import check
from runsvc.store.schema import audit_events, metadata, runs
from runsvc_client.v1 import run_service_pb2 as pb
from runsvc_client.v1 import run_service_pb2_grpc as pb_grpc
from tests.e2e.test_cli import ServerProcess, free_port, kill
from tests.faults.conftest import issue, start_server
from tests.support.databases import pg_base_url
from tests.support.proxy import TcpProxy

RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.min_reconnect_backoff_ms", 1000),
]
CALL_TIMEOUT = 3.0
SETUP_CONCURRENCY = 32
KILL_AFTER_OUTAGE = 5.0  # a worker dies this long after an outage ended
# After an outage, errors are still expected while the channel reconnects.
OUTAGE_TAIL = 5.0


def env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    return float(raw) if raw.strip() else default


@dataclass
class Lease:
    tenant: str
    run_id: str
    epoch: int
    metadata: list[tuple[str, str]]
    last_ok: float = 0.0
    killed_at: float | None = None
    last_ok_before_kill: float | None = None
    detected_at: float | None = None
    lost_at: float | None = None


@dataclass
class Outage:
    kind: str
    started: float
    ended: float = 0.0


@dataclass
class Soak:
    args: argparse.Namespace
    engine: Engine
    proxy: TcpProxy
    data_dir: Path
    address: str
    started: float = field(default_factory=time.monotonic)
    server: ServerProcess | None = None
    servers: list[dict[str, Any]] = field(default_factory=list)
    leases: list[Lease] = field(default_factory=list)
    outages: list[Outage] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)
    codes_outside: Counter[str] = field(default_factory=Counter)
    stopping: bool = False

    # --- the server ----------------------------------------------------------------

    def start_server(self) -> None:
        server = start_server(
            self.data_dir,
            self.proxy_url,
            address=self.address,
            RUNSVC_STALE_AFTER_SECONDS=str(self.args.stale),
            RUNSVC_REAP_INTERVAL_SECONDS=str(self.args.reap_interval),
            RUNSVC_GRPC_MAX_WORKERS="32",
            RUNSVC_TENANT_SLOTS="10",
        )
        self.server = server
        self.servers.append(
            {"pid": server.process.pid, "rss_kib_start": rss_kib(server.process.pid)}
        )

    def stop_server(self, how: str) -> None:
        assert self.server is not None
        self.servers[-1]["rss_kib_end"] = rss_kib(self.server.process.pid)
        self.servers[-1]["ended_by"] = how
        kill(self.server.process)
        self.server = None

    @property
    def proxy_url(self) -> str:
        host, port = self.proxy.address.rsplit(":", 1)
        url = make_url(str(self.engine.url)).set(host=host, port=int(port))
        return url.render_as_string(hide_password=False)

    # --- phases --------------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() - self.started

    def in_outage(self, at: float) -> bool:
        for outage in self.outages:
            end = outage.ended or float("inf")
            if outage.started <= at <= end + OUTAGE_TAIL:
                return True
        return False

    async def set_up(self, channel: grpc.aio.Channel) -> None:
        stub = pb_grpc.RunServiceStub(channel)
        gate = asyncio.Semaphore(SETUP_CONCURRENCY)

        async def one(i: int) -> Lease:
            tenant = f"soak-{i:05d}"
            async with gate:
                await stub.CreateRun(
                    pb.CreateRunRequest(
                        request_id=f"soak-{tenant}",
                        jobs=[pb.JobSpec(external_id="call-0", payload=b"x")],
                    ),
                    metadata=[("authorization", f"Bearer {issue('backend', tenant)}")],
                    timeout=30,
                )
                worker = [("authorization", f"Bearer {issue('worker', tenant, subject=tenant)}")]
                claim = await stub.ClaimRun(
                    pb.ClaimRunRequest(worker_id=tenant), metadata=worker, timeout=30
                )
            return Lease(tenant, claim.run.id, claim.lease_epoch, worker, time.monotonic())

        self.leases = list(await asyncio.gather(*(one(i) for i in range(self.args.runs))))

    async def heartbeat(self, stub: pb_grpc.RunServiceStub, lease: Lease) -> None:
        every = self.args.heartbeat_every
        await asyncio.sleep(random.uniform(0, every))
        request = pb.HeartbeatRequest(run_id=lease.run_id, lease_epoch=lease.epoch)
        while not self.stopping and lease.killed_at is None:
            at = self.now()
            try:
                await stub.Heartbeat(request, metadata=lease.metadata, timeout=CALL_TIMEOUT)
                code = "OK"
                lease.last_ok = time.monotonic()
            except grpc.aio.AioRpcError as error:
                code = error.code().name
            self.codes[code] += 1
            if not self.in_outage(at):
                self.codes_outside[code] += 1
            if code == "FAILED_PRECONDITION":  # the lease is lost: the run was ended
                lease.lost_at = self.now()
                return
            await asyncio.sleep(every if code == "OK" else min(1.0, every))

    async def outages_and_kills(self) -> None:
        args = self.args
        kills = 0
        number = 0
        while True:
            at = args.outage_every / 2 + number * args.outage_every
            # Each outage ends before the soak does; its kill is waited for after.
            if at + max(args.blackhole_seconds, args.restart_down) + 5 > args.seconds:
                break
            await asyncio.sleep(max(0.0, at - self.now()))
            kind = "server_restart" if number % 2 == 0 else "pg_blackhole"
            outage = Outage(kind, self.now())
            self.outages.append(outage)
            if kind == "server_restart":
                await asyncio.to_thread(self.stop_server, "SIGKILL")
                await asyncio.sleep(args.restart_down)
                await asyncio.to_thread(self.start_server)
            else:
                self.proxy.blackhole()
                await asyncio.sleep(args.blackhole_seconds)
                self.proxy.restore()
            outage.ended = self.now()
            number += 1
            if kills < args.kills:
                await asyncio.sleep(KILL_AFTER_OUTAGE)
                alive = [x for x in self.leases if x.killed_at is None and x.lost_at is None]
                doomed = random.choice(alive)
                doomed.last_ok_before_kill = doomed.last_ok
                doomed.killed_at = time.monotonic()
                kills += 1

    def killed(self) -> list[Lease]:
        return [x for x in self.leases if x.killed_at is not None]

    async def watch_detections(self) -> None:
        while not self.stopping:
            waiting = [x for x in self.killed() if x.detected_at is None]
            if waiting:
                states = await asyncio.to_thread(self.states, [x.run_id for x in waiting])
                seen = time.monotonic()
                for lease in waiting:
                    if states.get(lease.run_id) != "RUNNING":
                        lease.detected_at = seen
            await asyncio.sleep(0.5)

    def states(self, run_ids: list[str]) -> dict[str, str]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(runs.c.id, runs.c.state).where(runs.c.id.in_(run_ids)))
            return {str(r.id): str(r.state) for r in rows}

    async def main(self) -> None:
        self.start_server()
        channel = grpc.aio.insecure_channel(self.address, options=RECONNECT)
        try:
            set_up_started = time.monotonic()
            await self.set_up(channel)
            print(
                f"{len(self.leases)} runs created and claimed in "
                f"{time.monotonic() - set_up_started:.1f} s",
                flush=True,
            )
            assert self.server is not None
            self.servers[-1]["rss_kib_after_setup"] = rss_kib(self.server.process.pid)
            self.started = time.monotonic()
            stub = pb_grpc.RunServiceStub(channel)
            beats = [asyncio.create_task(self.heartbeat(stub, x)) for x in self.leases]
            watcher = asyncio.create_task(self.watch_detections())
            faults = asyncio.create_task(self.outages_and_kills())
            await asyncio.sleep(self.args.seconds)
            await faults
            # Give the last kills the time to be detected (threshold + reaper + slack).
            limit = time.monotonic() + self.args.stale + self.args.reap_interval + 30
            while any(x.detected_at is None for x in self.killed()):
                if time.monotonic() > limit:
                    break
                await asyncio.sleep(0.5)
            self.stopping = True
            await asyncio.gather(*beats, watcher)
        finally:
            await channel.close()

    # --- the result ----------------------------------------------------------------

    def result(self) -> dict[str, Any]:
        killed = self.killed()
        run_ids = [x.run_id for x in self.leases]
        with self.engine.connect() as conn:
            states = dict(
                conn.execute(select(runs.c.id, runs.c.state).where(runs.c.id.in_(run_ids))).all()
            )
            stale_detections = conn.execute(
                select(func.count()).where(audit_events.c.tag == "STALE_DETECTION")
            ).scalar_one()
            violations = [str(v) for v in check.violations(conn)]
        live = [x for x in self.leases if x.killed_at is None]
        false_stops = [
            {"run_id": x.run_id, "state": states.get(x.run_id), "lease_lost_at": x.lost_at}
            for x in live
            if states.get(x.run_id) != "RUNNING" or x.lost_at is not None
        ]
        detections = []
        for lease in killed:
            assert lease.killed_at is not None
            entry: dict[str, Any] = {
                "run_id": lease.run_id,
                "killed_at": round(lease.killed_at - self.started, 1),
                "state": states.get(lease.run_id),
            }
            if lease.detected_at is not None:
                entry["after_kill"] = round(lease.detected_at - lease.killed_at, 2)
                if lease.last_ok_before_kill:
                    entry["after_last_heartbeat"] = round(
                        lease.detected_at - lease.last_ok_before_kill, 2
                    )
            detections.append(entry)
        latencies = [d["after_last_heartbeat"] for d in detections if "after_last_heartbeat" in d]
        return {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
            "load_average_at_end": list(os.getloadavg()),
            "settings": {
                "seconds": self.args.seconds,
                "runs": self.args.runs,
                "heartbeat_every": self.args.heartbeat_every,
                "stale_after": self.args.stale,
                "reap_interval": self.args.reap_interval,
                "outage_every": self.args.outage_every,
                "restart_down": self.args.restart_down,
                "blackhole_seconds": self.args.blackhole_seconds,
            },
            "outages": [
                {
                    "kind": o.kind,
                    "at": round(o.started, 1),
                    "lasted": round(o.ended - o.started, 1),
                }
                for o in self.outages
            ],
            "false_stops": len(false_stops),
            "false_stop_runs": false_stops,
            "killed": len(killed),
            "detected": len(latencies),
            "detection_bound": self.args.stale + self.args.reap_interval + 1.0,
            "detection_max_after_last_heartbeat": max(latencies) if latencies else None,
            "detections": detections,
            "stale_detections": stale_detections,
            "heartbeats_by_code": dict(self.codes),
            "heartbeats_by_code_outside_outages": dict(self.codes_outside),
            "violations": violations,
            "servers": self.servers,
        }


def table(result: dict[str, Any]) -> str:
    s = result["settings"]
    first, last = result["servers"][0], result["servers"][-1]
    kinds = Counter(o["kind"] for o in result["outages"])
    rows = [
        (
            "runs heartbeating",
            f"{s['runs']} every {s['heartbeat_every']:g} s for {s['seconds']:g} s",
        ),
        ("threshold / reaper", f"{s['stale_after']:g} s / every {s['reap_interval']:g} s"),
        (
            "outages",
            ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
            + f" (restart: down {s['restart_down']:g} s + start-up;"
            f" blackhole {s['blackhole_seconds']:g} s)",
        ),
        ("false stops", str(result["false_stops"])),
        (
            "killed workers detected",
            f"{result['detected']} of {result['killed']}",
        ),
        (
            "detection, max after last heartbeat",
            f"{result['detection_max_after_last_heartbeat']} s"
            f" (bound {result['detection_bound']:g} s)",
        ),
        ("STALE_DETECTION audit rows", str(result["stale_detections"])),
        ("heartbeats by code", json.dumps(result["heartbeats_by_code"], sort_keys=True)),
        (
            "  outside outages",
            json.dumps(result["heartbeats_by_code_outside_outages"], sort_keys=True),
        ),
        ("invariant violations", str(len(result["violations"]))),
        (
            "server RSS (KiB)",
            f"first process {first['rss_kib_start']} at start, "
            f"{first.get('rss_kib_after_setup')} with the runs set up; "
            f"last process {last['rss_kib_start']} at start, {last.get('rss_kib_end')} at end "
            f"({len(result['servers'])} processes)",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def failed(result: dict[str, Any]) -> bool:
    return bool(
        result["false_stops"]
        or result["detected"] != result["killed"]
        or result["violations"]
        or (
            result["detection_max_after_last_heartbeat"] is not None
            and result["detection_max_after_last_heartbeat"] > result["detection_bound"]
        )
    )


def fresh_database() -> tuple[str, Engine]:
    base = make_url(pg_base_url())
    name = f"runsvc_soak_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = base.set(database=name).render_as_string(hide_password=False)
    engine = create_engine(url, pool_size=2)
    metadata.create_all(engine)
    return name, engine


def drop_database(name: str) -> None:
    admin = create_engine(make_url(pg_base_url()), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=env_number("SOAK_SECONDS", 600))
    parser.add_argument("--runs", type=int, default=int(env_number("SOAK_RUNS", 1000)))
    parser.add_argument("--heartbeat-every", type=float, default=5.0)
    parser.add_argument("--stale", type=float, default=30.0, help="the stale threshold")
    parser.add_argument("--reap-interval", type=float, default=5.0)
    parser.add_argument("--outage-every", type=float, default=60.0)
    parser.add_argument("--restart-down", type=float, default=5.0, help="before the restart")
    parser.add_argument("--blackhole-seconds", type=float, default=15.0)
    parser.add_argument("--kills", type=int, default=5, help="workers killed on purpose")
    parser.add_argument("--seed", type=int, default=20261201)
    parser.add_argument(
        "--output", type=Path, default=Path("bench/results/soak-faults.json"), help="JSON file"
    )
    args = parser.parse_args(argv)
    if args.blackhole_seconds >= args.stale or args.restart_down >= args.stale:
        parser.error("every outage must be shorter than the stale threshold")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    random.seed(args.seed)
    name, engine = fresh_database()
    url = make_url(str(engine.url))
    work = Path(tempfile.mkdtemp(prefix="runsvc-soak-"))
    try:
        with TcpProxy(upstream=(url.host or "127.0.0.1", url.port or 5432)) as proxy:
            soak = Soak(args, engine, proxy, work, f"127.0.0.1:{free_port()}")
            try:
                asyncio.run(soak.main())
            finally:
                if soak.server is not None:
                    soak.stop_server("end")
            result = soak.result()
    finally:
        engine.dispose()
        drop_database(name)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"JSON: {args.output}; server logs: {work}")
    return 1 if failed(result) else 0


if __name__ == "__main__":
    sys.exit(main())
