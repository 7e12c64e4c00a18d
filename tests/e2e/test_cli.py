"""The ``runsvc`` command against a real server process on a free port.

The server keeps its SQLite database and its signing secret in a temporary
data folder; the CLI, given the same folder, mints its own admin token.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runsvc_client.v1 import run_service_pb2 as pb
from runsvc_client.v1 import run_service_pb2_grpc as pb_grpc

STARTUP_TIMEOUT = 20.0
SHUTDOWN_TIMEOUT = 15.0
CLI_TIMEOUT = 30.0


def runsvc_command() -> list[str]:
    script = Path(sys.executable).with_name("runsvc")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "runsvc.cli"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_environ() -> dict[str, str]:
    """The test's environment without any RUNSVC_* setting of the machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNSVC_")}
    # Any free port: never the default one, which a server on this host may hold.
    env["RUNSVC_METRICS_ADDRESS"] = "127.0.0.1:0"
    return env


def json_lines(text: str) -> list[dict[str, Any]]:
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    data_dir: Path
    address: str
    stderr_path: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            **clean_environ(),
            "RUNSVC_DATA_DIR": str(self.data_dir),
            "RUNSVC_GRPC_ADDRESS": self.address,
        }

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def cli(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*runsvc_command(), *args],
            env=self.env if env is None else env,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            check=False,
        )

    def cli_json(self, *args: str) -> Any:
        """The one record a command printed with ``--json``."""
        [record] = self.cli_records(*args)
        return record

    def cli_records(self, *args: str) -> list[Any]:
        """The JSON lines a command printed (the run commands are asked for ``--json``)."""
        run_command = args[0] in {"runs", "cancel", "force-cancel"}
        done = self.cli(*args, *(["--json"] if run_command else []))
        assert done.returncode == 0, f"runsvc {' '.join(args)} failed: {done.stderr}"
        return [json.loads(line) for line in done.stdout.splitlines()]

    def token(self, role: str, tenant: str | None = None, subject: str | None = None) -> str:
        args = ["token", "--role", role] + (["--tenant", tenant] if tenant else [])
        args += ["--subject", subject] if subject else []
        done = self.cli(*args)
        assert done.returncode == 0, done.stderr
        token = done.stdout.strip()
        assert token.count(".") == 2, token
        return token

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    def metrics(self) -> str:
        """Its /metrics page (the port from its "serving metrics" log line)."""
        port = next(
            line["metrics_port"]
            for line in json_lines(self.stderr())
            if line.get("message") == "serving metrics"
        )
        return scrape(int(port))


def scrape(metrics_port: int) -> str:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def handled_calls(metrics: str, method: str = "") -> float:
    """``grpc_server_handled_total`` of ``method`` (every method when empty), every code."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("grpc_server_handled_total{") and f'grpc_method="{method}' in line
    )


def wait_serving(server: ServerProcess, timeout: float = STARTUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    with server.channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if server.process.poll() is not None:
                pytest.fail(
                    f"the server exited with {server.process.returncode}:\n{server.stderr()}"
                )
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server was not SERVING within {timeout} s:\n{server.stderr()}")
            time.sleep(0.1)


def kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=SHUTDOWN_TIMEOUT)


def spawn_server(
    env: dict[str, str],
    data_dir: Path,
    address: str,
    stderr_path: Path,
    *serve_args: str,
    timeout: float = STARTUP_TIMEOUT,
    command: Sequence[str] | None = None,
) -> ServerProcess:
    """``runsvc serve [serve_args]`` (or ``command``) in a process of its own with ``env``,
    once it answers SERVING (within ``timeout`` seconds)."""
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [*(command or [*runsvc_command(), "serve"]), *serve_args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    server = ServerProcess(process, data_dir, address, stderr_path)
    try:
        wait_serving(server, timeout)
    except BaseException:
        kill(process)
        raise
    return server


def start_server(data_dir: Path, **overrides: str) -> ServerProcess:
    data_dir.mkdir(parents=True, exist_ok=True)
    stderr_path = data_dir.parent / f"{data_dir.name}-server.stderr"
    address = f"127.0.0.1:{free_port()}"
    env = {
        **clean_environ(),
        "RUNSVC_DATA_DIR": str(data_dir),
        "RUNSVC_GRPC_ADDRESS": address,
        "RUNSVC_STALE_AFTER_SECONDS": "1.5",
        "RUNSVC_REAP_INTERVAL_SECONDS": "0.5",
        **overrides,
    }
    return spawn_server(env, data_dir, address, stderr_path)


@pytest.fixture(scope="module")
def cli_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    running = start_server(tmp_path_factory.mktemp("cli") / "data")
    try:
        yield running
    finally:
        kill(running.process)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def create_run(server: ServerProcess, token: str, request_id: str, jobs: int = 2) -> pb.Run:
    with server.channel() as channel:
        reply = pb_grpc.RunServiceStub(channel).CreateRun(
            pb.CreateRunRequest(
                request_id=request_id,
                jobs=[
                    pb.JobSpec(external_id=f"job-{i}", payload=f"{i}".encode()) for i in range(jobs)
                ],
            ),
            metadata=bearer(token),
            timeout=10,
        )
    assert reply.run.id
    return reply.run


# --- without a server ----------------------------------------------------------------


def test_migrate_sql_for_postgresql_needs_no_database(tmp_path: Path) -> None:
    env = {
        **clean_environ(),
        "RUNSVC_DATA_DIR": str(tmp_path),
        "RUNSVC_DATABASE_URL": "postgresql+psycopg2://runsvc@127.0.0.1:1/runsvc",
    }
    done = subprocess.run(
        [*runsvc_command(), "migrate", "--sql"],
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "CREATE TABLE runs" in done.stdout
    assert "CREATE TABLE jobs" in done.stdout
    assert not (tmp_path / "runsvc.db").exists()


def test_bad_settings_exit_with_usage_error(tmp_path: Path) -> None:
    env = {
        **clean_environ(),
        "RUNSVC_DATA_DIR": str(tmp_path),
        "RUNSVC_STALE_AFTER_SECONDS": "abc",
        "RUNSVC_TENANT_SLOTS": "0",
    }
    done = subprocess.run(
        [*runsvc_command(), "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert done.returncode == 2
    assert "RUNSVC_STALE_AFTER_SECONDS" in done.stderr
    assert "RUNSVC_TENANT_SLOTS" in done.stderr


# --- against a running server ----------------------------------------------------------


def test_server_created_its_secret(cli_server: ServerProcess) -> None:
    secret = cli_server.data_dir / "jwt-secret"
    assert secret.is_file()
    assert secret.stat().st_mode & 0o777 == 0o600
    assert (cli_server.data_dir / "runsvc.db").is_file()
    # Its first plain lines say where things are and what to type next.
    plain = [line for line in cli_server.stderr().splitlines() if not line.startswith("{")]
    assert plain[0].startswith("runsvc is serving on 127.0.0.1:"), plain
    assert f"data:           {cli_server.data_dir}" in plain[1]
    assert f"signing secret: {secret} (new" in plain[2]
    assert any(line.strip().endswith("runs create --jobs 100") for line in plain[3:])


def test_token_is_refused_for_a_backend_without_tenant(cli_server: ServerProcess) -> None:
    done = cli_server.cli("token", "--role", "backend")
    assert done.returncode == 2
    assert "tenant" in done.stderr
    assert done.stdout == ""


def test_backend_flow(cli_server: ServerProcess) -> None:
    token = cli_server.token("backend", "t1")

    nothing = cli_server.cli("runs", "active", "--token", token)
    assert nothing.returncode != 0
    assert "NOT_FOUND" in nothing.stderr
    assert nothing.stdout == ""

    run = create_run(cli_server, token, "cli-flow-1")
    assert run.tenant_id == "t1"
    assert run.state == pb.RUN_STATE_PENDING

    active = cli_server.cli_json("runs", "active", "--token", token)
    assert active["id"] == run.id
    assert active["tenant_id"] == "t1"
    assert active["state"] == "PENDING"
    assert active["jobs"] == {
        "total": 2,
        "queued": 2,
        "in_progress": 0,
        "completed": 0,
        "failed": 0,
    }
    assert active["lease_epoch"] == 0 and active["number"] == run.number

    listing = cli_server.cli_records("runs", "list", "--token", token)
    assert run.id in [r["id"] for r in listing]
    assert {r["tenant_id"] for r in listing} == {"t1"}

    pending = cli_server.cli_records("runs", "list", "--state", "pending", "--token", token)
    assert [r["id"] for r in pending] == [run.id]

    cancelled = cli_server.cli_json("cancel", run.id, "--reason", "not needed", "--token", token)
    assert cancelled["id"] == run.id
    assert cancelled["state"] == "CANCELLED"
    assert cancelled["stop_reason"] == "CANCELLED_BY_USER"
    assert cancelled["cancel_reason"] == "not needed"

    forced = cli_server.cli_json("force-cancel", run.id, "--token", token)
    assert forced["id"] == run.id
    assert forced["state"] == "CANCELLED"

    # Without --token and without RUNSVC_TOKEN the CLI mints an admin token.
    assert "RUNSVC_TOKEN" not in cli_server.env
    fetched = cli_server.cli_json("runs", "get", run.id)
    assert fetched["id"] == run.id
    assert fetched["state"] == "CANCELLED"
    by_number = cli_server.cli_json("runs", "get", str(run.number), "--token", token)
    assert by_number["id"] == run.id and by_number["number"] == run.number

    after = cli_server.cli("runs", "active", "--token", token)
    assert after.returncode != 0
    assert "NOT_FOUND" in after.stderr


def test_force_cancel_of_a_pending_run(cli_server: ServerProcess) -> None:
    token = cli_server.token("backend", "t2")
    run = create_run(cli_server, token, "cli-force-1", jobs=3)
    forced = cli_server.cli_json("force-cancel", run.id, "--reason", "operator", "--token", token)
    assert forced["state"] == "CANCELLED"
    assert forced["stop_reason"] == "FORCE_CANCELLED"
    assert forced["cancelled_jobs"] == 3


def test_a_backend_cannot_see_another_tenants_run(cli_server: ServerProcess) -> None:
    run = create_run(cli_server, cli_server.token("backend", "t3"), "cli-hidden-1")
    other = cli_server.token("backend", "t4")
    done = cli_server.cli("runs", "get", run.id, "--token", other)
    assert done.returncode != 0
    assert "PERMISSION_DENIED" in done.stderr
    assert run.id not in done.stderr
    assert cli_server.cli_json("runs", "get", run.id)["tenant_id"] == "t3"


def test_the_token_from_runsvc_token_is_used(cli_server: ServerProcess) -> None:
    token = cli_server.token("backend", "t5")
    env = {**cli_server.env, "RUNSVC_TOKEN": token}
    done = cli_server.cli("runs", "active", env=env)
    assert done.returncode != 0
    assert "NOT_FOUND" in done.stderr
    worker = cli_server.token("worker")
    denied = cli_server.cli("runs", "active", env={**cli_server.env, "RUNSVC_TOKEN": worker})
    assert denied.returncode != 0
    assert "PERMISSION_DENIED" in denied.stderr


def test_a_silent_worker_loses_its_run(cli_server: ServerProcess) -> None:
    backend = cli_server.token("backend", "t6")
    worker = cli_server.token("worker", "t6", subject="w-silent")
    run = create_run(cli_server, backend, "cli-stale-1")
    with cli_server.channel() as channel:
        stub = pb_grpc.RunServiceStub(channel)
        claim = stub.ClaimRun(
            pb.ClaimRunRequest(worker_id="w-silent"), metadata=bearer(worker), timeout=10
        )
        assert claim.run.id == run.id
        assert claim.lease_epoch >= 1
        # No heartbeat: stale after 1.5 s, reaped within a 0.5 s interval.
        deadline = time.monotonic() + 15
        while True:
            got = stub.GetRun(pb.GetRunRequest(run_id=run.id), metadata=bearer(backend), timeout=5)
            if got.run.state != pb.RUN_STATE_RUNNING or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert got.run.state == pb.RUN_STATE_STOPPED
    assert got.run.stop_reason == "HEARTBEAT_TIMEOUT"
    assert got.run.end_time.ToDatetime() >= claim.run.start_time.ToDatetime()


def test_reap_once_prints_a_report(cli_server: ServerProcess) -> None:
    report = cli_server.cli_json("reap", "--once")
    assert isinstance(report["total"], int)
    assert report["total"] == sum(report["ended"].values())


# --- shutdown ---------------------------------------------------------------------------


def test_sigterm_stops_the_server_cleanly(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data")
    try:
        server.process.send_signal(signal.SIGTERM)
        returncode = server.process.wait(timeout=SHUTDOWN_TIMEOUT)
    finally:
        kill(server.process)
    assert returncode == 0, server.stderr()
    messages = [record.get("message") for record in json_lines(server.stderr())]
    assert "serving" in messages
    assert "stopping" in messages
    assert "stopped" in messages
    assert messages.index("stopping") < messages.index("stopped")


def test_audit_list_shows_refusals_for_a_run_and_a_tenant(cli_server: ServerProcess) -> None:
    run = create_run(cli_server, cli_server.token("backend", "t7"), "cli-audit-1")
    intruder = cli_server.token("backend", "t8", subject="intruder")
    assert cli_server.cli("runs", "get", run.id, "--token", intruder).returncode != 0
    number = str(run.number)
    assert cli_server.cli("runs", "get", number, "--token", intruder).returncode != 0
    assert cli_server.cli("force-cancel", run.id, "--reason", "ops").returncode == 0
    done = cli_server.cli("audit", "list", "--run", run.id)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["tag"], r["action"]) for r in rows] == [
        ("SECURITY", "RUN_NOT_VISIBLE"),
        ("FORCE_CANCEL", "RUN_ENDED"),
    ]
    assert rows[0]["actor"] == "intruder" and rows[0]["tenant_id"] == "t8"
    # By its number: the same rows, and the refusal that named the run by that number.
    by_number = cli_server.cli("audit", "list", "--run", number)
    rows = [json.loads(line) for line in by_number.stdout.splitlines()]
    assert [(r["action"], r["run_id"]) for r in rows] == [
        ("RUN_NOT_VISIBLE", run.id),
        ("RUN_NOT_VISIBLE", number),
        ("RUN_ENDED", run.id),
    ]
    by_tenant = cli_server.cli("audit", "list", "--tenant", "t8")
    assert [json.loads(line)["run_id"] for line in by_tenant.stdout.splitlines()] == [
        run.id,
        number,
    ]


def test_the_cli_mints_a_token_only_for_a_server_on_this_host(
    cli_server: ServerProcess, tmp_path: Path
) -> None:
    """An admin token for every tenant never leaves the host: no token, no call elsewhere."""
    for address in ("10.255.255.1:50051", "runsvc.example.com:50051", "[2001:db8::1]:50051"):
        done = cli_server.cli("runs", "active", "--tenant", "t1", "--address", address)
        assert done.returncode == 2, done.stderr
        assert "RUNSVC_TOKEN" in done.stderr and "loopback" in done.stderr, done.stderr
        assert "UNAVAILABLE" not in done.stderr and "DEADLINE" not in done.stderr
    # On this host it does, through every spelling of the loopback.
    port = cli_server.address.rpartition(":")[2]
    for address in (cli_server.address, f"localhost:{port}", f"127.0.0.1:{port}"):
        done = cli_server.cli("runs", "active", "--tenant", "nobody", "--address", address)
        assert done.returncode == 1 and "NOT_FOUND" in done.stderr, (address, done.stderr)


def test_no_command_but_serve_creates_a_secret(tmp_path: Path) -> None:
    """Run from a folder with no secret, a command says so and leaves nothing behind."""
    env = {**clean_environ(), "RUNSVC_GRPC_ADDRESS": f"127.0.0.1:{free_port()}"}
    for args in (["runs", "active", "--tenant", "t1"], ["token", "--role", "admin"]):
        done = subprocess.run(
            [*runsvc_command(), *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            check=False,
        )
        assert done.returncode == 2, done.stderr
        assert ("no signing secret" in done.stderr and "RUNSVC_TOKEN" in done.stderr) or (
            "RUNSVC_JWT_SECRET" in done.stderr
        ), done.stderr
        assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_runs_create_from_a_csv_file_and_the_stale_view(tmp_path: Path) -> None:
    # Silent runs are listed, not reaped, whatever the machine's speed: a long threshold.
    server = start_server(
        tmp_path / "data",
        RUNSVC_STALE_AFTER_SECONDS="600",
        RUNSVC_STARTUP_CLEANUP_AFTER_SECONDS="600",
    )
    try:
        calls = tmp_path / "calls.csv"
        calls.write_text("external_id\n+972500000001\n+972500000002\n\n+972500000003\n")
        runs = []
        for tenant in ("t6", "t7"):
            token = server.token("backend", tenant)
            created = server.cli_json("runs", "create", "--csv", str(calls), "--token", token)
            assert created["jobs"]["total"] == 3 and created["state"] == "PENDING"
            worker = server.token("worker", tenant, subject=f"dialer-{tenant}")
            with server.channel() as channel:
                claim = pb_grpc.RunServiceStub(channel).ClaimRun(
                    pb.ClaimRunRequest(worker_id=f"dialer-{tenant}"),
                    metadata=bearer(worker),
                    timeout=10,
                )
            assert claim.run.id == created["id"]
            runs.append(created)
        silent = server.cli_records("runs", "stale", "--limit", "5")
        # The longest silence first: the run claimed first.
        assert [s["id"] for s in silent] == [r["id"] for r in runs], silent
        assert [s["worker_id"] for s in silent] == ["dialer-t6", "dialer-t7"]
        assert [s["number"] for s in silent] == [r["number"] for r in runs]
        assert silent[0]["age_seconds"] >= silent[1]["age_seconds"] >= 0
        assert [s["stale"] for s in silent] == [False, False]
        assert len(server.cli_records("runs", "stale", "--limit", "1")) == 1
        readable = server.cli("runs", "stale")
        assert readable.returncode == 0 and "dialer-t6" in readable.stdout
        # The server says who took which run, and who took its own run again after a crash.
        worker = server.token("worker", "t6", subject="dialer-t6")
        with server.channel() as channel:
            again = pb_grpc.RunServiceStub(channel).ClaimRun(
                pb.ClaimRunRequest(worker_id="dialer-t6"), metadata=bearer(worker), timeout=10
            )
        assert again.resumed and again.run.id == runs[0]["id"]
        said = [
            (line["message"], line.get("worker_id"), line.get("run_number"))
            for line in json_lines(server.stderr())
            if line.get("message") in {"run claimed", "run resumed"}
        ]
        assert said == [
            ("run claimed", "dialer-t6", runs[0]["number"]),
            ("run claimed", "dialer-t7", runs[1]["number"]),
            ("run resumed", "dialer-t6", runs[0]["number"]),
        ]
    finally:
        kill(server.process)


def test_on_the_servers_host_create_then_active_work_as_typed(cli_server: ServerProcess) -> None:
    """No token, no --tenant: the minted admin token acts for the local tenant, said so."""
    created = cli_server.cli("runs", "create", "--jobs", "3", "--json")
    assert created.returncode == 0, created.stderr
    assert "acting for tenant 'default'" in created.stderr
    run = json.loads(created.stdout)
    assert (run["tenant_id"], run["jobs"]["total"], run["state"]) == ("default", 3, "PENDING")
    active = cli_server.cli("runs", "active", "--json")
    assert active.returncode == 0, active.stderr
    assert json.loads(active.stdout)["id"] == run["id"]
    assert cli_server.cli("force-cancel", str(run["number"])).returncode == 0
