"""A throwaway PostgreSQL cluster of the test's own, so that it can be crashed and restarted.

The machine's shared server is never touched: ``initdb`` into a temporary
folder, a free port on loopback, run as the ``postgres`` user (``pg_ctl``
refuses root). ``crash()`` is ``pg_ctl stop -m immediate``: no checkpoint,
recovery from the WAL at the next start, as after a power cut.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

BIN = Path("/usr/lib/postgresql/15/bin")


def _as_postgres(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    command = [*args]
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def available() -> bool:
    return (BIN / "pg_ctl").exists() and (os.geteuid() != 0 or shutil.which("runuser") is not None)


class Cluster:
    def __init__(self, port: int) -> None:
        self.port = port
        self.root = Path(tempfile.mkdtemp(prefix="runsvc-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        done = _as_postgres(
            str(BIN / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr}")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        done = _as_postgres(
            str(BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-t",
            "30",
            "-o",
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {done.stderr}{self.log.read_text()}")

    def running(self) -> bool:
        return _as_postgres(str(BIN / "pg_ctl"), "-D", str(self.data), "status").returncode == 0

    def crash(self) -> None:
        done = _as_postgres(str(BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl stop failed: {done.stderr}")

    def destroy(self) -> None:
        _as_postgres(str(BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
