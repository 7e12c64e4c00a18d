"""Benchmark: scrape ``/metrics`` with many runs in a fresh PostgreSQL database.

Loads ``--runs`` runs (one live run for each of ``--tenants`` tenants, the
rest ended) with COPY, then times ``--scrapes`` HTTP scrapes of the real
exporter (store gauges included) and prints p50/p99. The database is dropped
at the end. Not a test: ``make bench-metrics``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import statistics
import time
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from runsvc.metrics.exporter import Exporter
from runsvc.server import build
from runsvc.settings import Settings
from runsvc.store.schema import metadata

DEFAULT_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
COLUMNS = (
    "id tenant_id request_id state stop_reason cancel_requested cancel_requested_at worker_id "
    "lease_epoch lock_ts last_heartbeat_at created_at started_at ended_at updated_at"
).split()
ENDED = (("COMPLETED", None), ("CANCELLED", "CANCELLED_BY_USER"), ("STOPPED", "HEARTBEAT_TIMEOUT"),
         ("FAILED", "WORKER_FAILED"))  # fmt: skip


def rows(runs: int, tenants: int, now: datetime) -> io.StringIO:
    rng = random.Random(7)
    out = io.StringIO()
    writer = csv.writer(out)
    for i in range(runs):
        tenant = f"tenant-{i % tenants:05d}"
        created = now - timedelta(seconds=rng.uniform(60, 90 * 24 * 3600))
        if i < tenants:  # one live run per tenant: most running, a few pending
            running = i % 10 != 0
            beat = now - timedelta(seconds=rng.uniform(0, 40 if i % 50 else 900))
            state, reason = ("RUNNING", None) if running else ("PENDING", None)
            writer.writerow([uuid.uuid4(), tenant, f"req-{i}", state, "", "f", "",
                             f"worker-{i}" if running else "", 1 if running else 0,
                             beat if running else "", beat if running else "", created,
                             created if running else "", "", beat])  # fmt: skip
            continue
        state, reason = ENDED[i % len(ENDED)]
        ended = created + timedelta(seconds=rng.uniform(10, 3600))
        writer.writerow([uuid.uuid4(), tenant, f"req-{i}", state, reason or "", "f", "", "", 1,
                         "", ended, created, created, ended, ended])  # fmt: skip
    out.seek(0)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--tenants", type=int, default=2_000)
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument(
        "--database-url", default=os.environ.get("RUNSVC_TEST_DATABASE_URL", DEFAULT_URL)
    )
    args = parser.parse_args()

    base = make_url(args.database_url)
    name = f"runsvc_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = base.set(database=name).render_as_string(hide_password=False)
    try:
        return bench(url, args)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def bench(url: str, args: argparse.Namespace) -> int:
    engine = create_engine(url)
    metadata.create_all(engine)
    started = time.perf_counter()
    raw = engine.raw_connection()
    try:
        with raw.cursor() as cursor:
            cursor.copy_expert(
                f"COPY runs ({', '.join(COLUMNS)}) FROM STDIN WITH (FORMAT csv, NULL '')",
                rows(args.runs, args.tenants, datetime.now(UTC)),
            )
        raw.commit()
    finally:
        raw.close()
    # As autovacuum leaves a table in steady state: the visibility map lets
    # the per-state count be an index-only scan.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE runs"))
    loaded = time.perf_counter() - started
    engine.dispose()

    settings = Settings(database_url=url, metrics_address="127.0.0.1:0", grpc_max_workers=4)
    components = build(settings)
    assert components.metrics is not None
    exporter = Exporter(components.metrics.registry, "127.0.0.1:0")
    exporter.start()
    endpoint = f"http://127.0.0.1:{exporter.port}/metrics"
    try:
        for _ in range(5):  # warm the pool and PostgreSQL's caches
            urllib.request.urlopen(endpoint, timeout=10).read()
        timings = []
        for _ in range(args.scrapes):
            t0 = time.perf_counter()
            with urllib.request.urlopen(endpoint, timeout=10) as response:
                body = response.read()
            timings.append((time.perf_counter() - t0) * 1000)
    finally:
        exporter.stop()
        components.db.dispose()
    timings.sort()
    lines = body.decode().splitlines()
    store = next(ln for ln in lines if ln.startswith("runsvc_store_scrape_duration_seconds "))
    report = {
        "runs": args.runs,
        "tenants": args.tenants,
        "load_seconds": round(loaded, 1),
        "scrapes": args.scrapes,
        "p50_ms": round(statistics.median(timings), 2),
        "p99_ms": round(timings[min(len(timings) - 1, int(len(timings) * 0.99))], 2),
        "max_ms": round(timings[-1], 2),
        "last_store_read_ms": round(float(store.split()[1]) * 1000, 2),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
