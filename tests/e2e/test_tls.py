"""TLS and mutual TLS end to end, with a CA and certificates made by the test."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runsvc.server import Server
from runsvc_client.v1 import run_service_pb2 as pb
from runsvc_client.v1 import run_service_pb2_grpc as pb_grpc
from tests.e2e.security_server import es256, serving, settings_for, snapshot
from tests.e2e.test_cli import clean_environ, runsvc_command
from tests.keys import Pki, make_pki, private_pem


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


def _files(pki: Pki, tmp_path: Path) -> dict[str, Path]:
    files = {
        "cert": tmp_path / "server.crt",
        "key": tmp_path / "server.key",
        "ca": tmp_path / "ca.crt",
    }
    files["cert"].write_bytes(pki.server_cert_pem)
    files["key"].write_bytes(private_pem(pki.server_key))
    files["ca"].write_bytes(pki.ca_pem)
    return files


def _database(tmp_path: Path) -> str:
    from runsvc.store import migrate

    url = f"sqlite:///{tmp_path / 'tls.db'}"
    migrate.upgrade(url)
    return url


@pytest.fixture
def tls_server(pki: Pki, tmp_path: Path) -> Iterator[Server]:
    files = _files(pki, tmp_path)
    config = settings_for(
        _database(tmp_path), tmp_path, tls_cert_file=files["cert"], tls_key_file=files["key"]
    )
    with serving(config) as server:
        yield server


@pytest.fixture
def mtls_server(pki: Pki, tmp_path: Path) -> Iterator[Server]:
    files = _files(pki, tmp_path)
    config = settings_for(
        _database(tmp_path),
        tmp_path,
        tls_cert_file=files["cert"],
        tls_key_file=files["key"],
        tls_client_ca_file=files["ca"],
    )
    with serving(config) as server:
        yield server


def secure(server: Server, pki: Pki, client: tuple[bytes, bytes] | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca_pem,
        private_key=client[0] if client else None,
        certificate_chain=client[1] if client else None,
    )
    return grpc.secure_channel(f"127.0.0.1:{server.port}", credentials)


def code(call: object) -> grpc.StatusCode:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_tls_serves_over_tls_only(tls_server: Server, pki: Pki) -> None:
    with secure(tls_server, pki) as channel:
        stub = pb_grpc.RunServiceStub(channel)
        assert (
            code(
                lambda: stub.GetActive(
                    pb.GetActiveRequest(), metadata=es256("backend", "t1"), timeout=10
                )
            )
            is grpc.StatusCode.NOT_FOUND
        )
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
    with grpc.insecure_channel(f"127.0.0.1:{tls_server.port}") as plain:
        stub = pb_grpc.RunServiceStub(plain)
        assert (
            code(
                lambda: stub.GetActive(
                    pb.GetActiveRequest(), metadata=es256("backend", "t1"), timeout=5
                )
            )
            is grpc.StatusCode.UNAVAILABLE
        )


def test_a_server_certificate_from_another_ca_is_refused(tls_server: Server) -> None:
    stranger = make_pki()
    with secure(tls_server, stranger) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert (
            code(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5))
            is grpc.StatusCode.UNAVAILABLE
        )


def test_mutual_tls_worker_certificate_stands_for_its_token(
    mtls_server: Server, pki: Pki, tmp_path: Path
) -> None:
    backend_cert = pki.client(common_name="web-backend", unit=None, tenant=None)
    worker_cert = pki.client(common_name="w1", unit="worker", tenant="t1")
    with secure(mtls_server, pki, backend_cert) as channel:
        stub = pb_grpc.RunServiceStub(channel)
        # A certificate without OU=worker proves the connection, not a role: a token is needed.
        assert (
            code(lambda: stub.GetActive(pb.GetActiveRequest(), timeout=10))
            is grpc.StatusCode.UNAUTHENTICATED
        )
        run = stub.CreateRun(
            pb.CreateRunRequest(request_id="r", jobs=[pb.JobSpec(external_id="a")]),
            metadata=es256("backend", "t1"),
            timeout=10,
        ).run
    with secure(mtls_server, pki, worker_cert) as channel:
        stub = pb_grpc.RunServiceStub(channel)
        # No token: the certificate is worker "w1" of tenant t1.
        claim = stub.ClaimRun(pb.ClaimRunRequest(worker_id="w1/p1"), timeout=10)
        assert claim.run.id == run.id
        stub.Heartbeat(
            pb.HeartbeatRequest(run_id=run.id, lease_epoch=claim.lease_epoch), timeout=10
        )
        assert (
            code(lambda: stub.ClaimRun(pb.ClaimRunRequest(worker_id="w2"), timeout=10))
            is grpc.StatusCode.PERMISSION_DENIED
        )
        assert (
            code(lambda: stub.GetActive(pb.GetActiveRequest(), timeout=10))
            is grpc.StatusCode.PERMISSION_DENIED
        )


def test_mutual_tls_refuses_clients_without_a_trusted_certificate(
    mtls_server: Server, pki: Pki, tmp_path: Path
) -> None:
    before = snapshot(f"sqlite:///{tmp_path / 'tls.db'}")
    stranger = make_pki().client(common_name="w1", unit="worker", tenant="t1")
    for client in (None, stranger):
        with secure(mtls_server, pki, client) as channel:
            stub = pb_grpc.RunServiceStub(channel)
            assert (
                code(lambda: stub.ClaimRun(pb.ClaimRunRequest(worker_id="w1"), timeout=5))  # noqa: B023
                is grpc.StatusCode.UNAVAILABLE
            )
    assert snapshot(f"sqlite:///{tmp_path / 'tls.db'}") == before


def test_the_cli_speaks_tls_when_given_the_ca(tls_server: Server, pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "cli").mkdir()
    files = _files(pki, tmp_path / "cli")
    token = es256("backend", "t1")[0][1].removeprefix("Bearer ")
    command = [
        *runsvc_command(),
        "runs",
        "active",
        "--address",
        f"127.0.0.1:{tls_server.port}",
        "--token",
        token,
        "--timeout",
        "5",
    ]
    env = {**clean_environ(), "RUNSVC_DATA_DIR": str(tmp_path / "cli")}
    over_tls = subprocess.run(
        [*command, "--ca-file", str(files["ca"])],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # The server answered: the tenant has no active run.
    assert over_tls.returncode == 1 and "NOT_FOUND" in over_tls.stderr, over_tls.stderr
    plain = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr, plain.stderr
