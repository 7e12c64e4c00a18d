"""``make bench-profile``: where a call's server CPU goes, per path.

Starts runsvc on a fresh PostgreSQL database (as ``make bench`` does), drives one path at a
time from the load process, and samples the server with ``py-spy record --gil`` (only the
thread holding the interpreter lock counts: the server's Python runs one thread at a time,
so that is where its capacity goes). Each sample is put in the first category that claims a
frame, walking from the innermost frame out, and the shares are multiplied by the server CPU
per call measured in the same drive. Writes ``bench/results/profile.json``, which
``tools/gen_perf_doc.py`` turns into a table of docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from bench.run import (
    RESULTS,
    ServerProcess,
    create_database,
    default_database_url,
    drive,
    drop_database,
    load,
)

# (category, path fragments of a frame that put a sample in it), tried from the innermost
# frame out: the first frame any category claims decides.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("database (SQLAlchemy, driver)", ("sqlalchemy/", "psycopg2/", "runsvc/store/")),
    ("group commit: queue, wait, wake", ("runsvc/service/heartbeats.py",)),
    (
        "edge: metadata, token, rate limit, role, metrics, logs",
        (
            "runsvc/api/edge.py",
            "runsvc/api/auth.py",
            "runsvc/tokens.py",
            "runsvc/ratelimit.py",
            "runsvc/logs.py",
            "runsvc/deadline.py",
            "prometheus_client/",
            "jwt/",
        ),
    ),
    (
        "use case, validation, conversion",
        ("runsvc/", "google/protobuf/", "runsvc_client/"),
    ),
    ("gRPC server and its threads", ("grpc/", "concurrent/futures/", "threading.py")),
]
OTHER = "other"
PATHS = [("Heartbeat", 64), ("GetRun", 64), ("Check", 64)]


def category(stack: list[str]) -> str:
    for frame in reversed(stack):
        for name, fragments in CATEGORIES:
            if any(fragment in frame for fragment in fragments):
                return name
    return OTHER


def shares(raw: Path) -> dict[str, float]:
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if stack and samples.isdigit():
            counts[category(stack.split(";"))] += int(samples)
    total = sum(counts.values()) or 1
    return {name: counts[name] / total for name, _ in [*CATEGORIES, (OTHER, ())]}


def sampling(spy: str, seconds: int, raw: Path, pid: int) -> list[str]:
    """py-spy sampling only the thread that holds the interpreter lock, as raw stacks."""
    options = ["--gil", "--nonblocking", "-r", "200", "-f", "raw", "-d", str(seconds)]
    return [spy, "record", *options, "-o", str(raw), "-p", str(pid)]


def profile(seconds: float) -> dict[str, Any]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    base = default_database_url()
    url = create_database(base)
    result: dict[str, Any] = {"seconds": seconds, "paths": {}}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            workdir = Path(scratch)
            targets_file = workdir / "targets.json"
            targets_file.write_text(json.dumps(load(url, history=1000)))
            server = ServerProcess(url, workdir, extra_env={})
            try:
                for rpc, concurrency in PATHS:
                    raw = workdir / f"{rpc}.txt"
                    sampler = subprocess.Popen(
                        sampling(spy, int(seconds), raw, server.process.pid),
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    row = drive(server, rpc, concurrency, targets_file, seconds)
                    sampler.wait(timeout=seconds + 30)
                    cpu = row["server_cpu_us_per_call"]
                    result["paths"][f"{rpc}@{concurrency}"] = {
                        "throughput": row["throughput"],
                        "server_cpu_us_per_call": cpu,
                        "shares": shares(raw),
                    }
                    print(f"profiled {rpc}@{concurrency}", file=sys.stderr)
            finally:
                server.stop()
    finally:
        drop_database(base, url)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--output", type=Path, default=RESULTS / "profile.json")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on the way out
    result = profile(args.seconds)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    for name, row in result["paths"].items():
        parts = ", ".join(f"{k} {v:.0%}" for k, v in row["shares"].items())
        print(f"{name}: {row['server_cpu_us_per_call']:.0f} µs/call: {parts}")


if __name__ == "__main__":
    main()
