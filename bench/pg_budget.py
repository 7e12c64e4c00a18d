"""PostgreSQL's own budget for heartbeats: ``python -m bench.pg_budget``.

The capacity model (docs/capacity.md) needs what the database can absorb,
apart from gRPC and Python's per-call costs: how many heartbeat rows per
second PostgreSQL applies when they arrive in batches of a given size
through runsvc's own batch statement (``runs.touch_leases``, one
transaction per batch, as the group commit flusher writes them), and how
many bytes of WAL each heartbeat costs. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from bench.run import LIVE_SQL, create_database, default_database_url, drop_database, machine
from runsvc.store import runs as run_store
from runsvc.store.clock import DatabaseClock

LIVE = 4096


def _touches(conn: Any) -> list[run_store.LeaseTouch]:
    rows = conn.execute(
        text("SELECT id, tenant_id, lease_epoch FROM runs WHERE state = 'RUNNING' ORDER BY id")
    ).all()
    return [run_store.LeaseTouch(r.id, r.tenant_id, r.lease_epoch, worker=None) for r in rows]


def _wal_lsn(conn: Any) -> int:
    return int(conn.execute(text("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")).scalar_one())


SETTINGS = ("server_version", "synchronous_commit", "fsync", "wal_sync_method", "shared_buffers")


def server_settings(url: str) -> dict[str, str]:
    """The PostgreSQL settings that decide what a commit costs."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return {
                name: str(conn.exec_driver_sql(f"SHOW {name}").scalar_one()) for name in SETTINGS
            }
    finally:
        engine.dispose()


def measure(url: str, *, batch: int, writers: int, seconds: float) -> dict[str, Any]:
    """Rows/s and WAL bytes/row for ``writers`` flushers writing batches of ``batch``."""
    engine = create_engine(url, pool_size=writers + 1)
    clock = DatabaseClock()
    with engine.connect() as conn:
        touches = _touches(conn)
        wal_before = _wal_lsn(conn)
    # Each writer owns a disjoint share of the runs, as batches of distinct calls do.
    shares = [touches[i::writers] for i in range(writers)]
    written = [0] * writers
    stop = time.monotonic() + seconds

    def write(k: int) -> None:
        share, offset = shares[k], 0
        while time.monotonic() < stop:
            chunk = [share[(offset + i) % len(share)] for i in range(batch)]
            offset = (offset + batch) % len(share)
            with engine.begin() as conn:
                touched = run_store.touch_leases(conn, chunk, now=clock.now(conn))
            written[k] += len(touched)

    started = time.monotonic()
    threads = [threading.Thread(target=write, args=(k,)) for k in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    with engine.connect() as conn:
        wal_after = _wal_lsn(conn)
    engine.dispose()
    rows = sum(written)
    return {
        "batch": batch,
        "writers": writers,
        "rows": rows,
        "rows_per_second": rows / elapsed,
        "wal_bytes_per_row": (wal_after - wal_before) / rows if rows else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", default=default_database_url())
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--batches", default="1,16,64,256")
    parser.add_argument(
        "--writers", default="1,2", help="flusher counts, each measured at every batch size"
    )
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    url = create_database(args.database_url)
    try:
        engine = create_engine(url)
        with engine.begin() as conn:
            conn.execute(
                text(LIVE_SQL), {"prefix": "budget-", "first": 0, "last": LIVE - 1, "age": 1}
            )
            conn.execute(text("ANALYZE"))
        engine.dispose()
        postgresql = server_settings(url)
        results = [
            measure(url, batch=int(size), writers=int(writers), seconds=args.seconds)
            for writers in args.writers.split(",")
            for size in args.batches.split(",")
        ]
    finally:
        drop_database(args.database_url, url)
    report = json.dumps(
        {
            "command": "python -m bench.pg_budget " + " ".join(sys.argv[1:]),
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "postgresql": postgresql,
            "live_runs": LIVE,
            "results": results,
        },
        indent=2,
    )
    print(report)
    if args.output is not None:
        args.output.write_text(report + "\n")


if __name__ == "__main__":
    main()
