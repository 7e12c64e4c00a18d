"""The pods of deploy/kubernetes, run as real processes with the environment they would get.

The migration Job's command migrates a fresh PostgreSQL database; the Deployment's command
then serves on it with Redis, answers every probe, serves the metrics the ServiceMonitor
scrapes, accepts the tokens the JWT settings describe, and stops on SIGTERM within the pod's
termination grace period. Only the listening addresses move to free loopback ports, and the
Redis key prefix to one of the test's own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import jwt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runsvc import tokens
from runsvc_client.v1 import run_service_pb2 as pb
from runsvc_client.v1 import run_service_pb2_grpc as pb_grpc
from tests.deploy.k8s_manifests import Manifest, container_env, one, render
from tests.deploy.test_kubernetes_references import IMAGE_PATHS
from tests.e2e.test_cli import free_port, kill, runsvc_command, spawn_server
from tests.keys import claims, ec_key, make_pki, private_pem, public_pem
from tests.support.databases import private_database

HS256_SECRET = "pod-test-secret-long-enough-for-an-hs256-key"
JOB_TIMEOUT = 60.0


@pytest.fixture
def empty_database() -> Iterator[str]:
    """A PostgreSQL database of this test's own, with no schema: the Job's to create."""
    with private_database("runsvc_k8s") as url:
        yield url


def pod_environment(
    objects: list[Manifest], kind: str, secrets: dict[tuple[str, str], str], root: Path
) -> tuple[Manifest, Manifest, dict[str, str]]:
    pod = one(objects, kind)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = container_env(
        container, pod, objects, secrets=secrets, files_root=root, image_paths=IMAGE_PATHS
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("RUNSVC_")}
    return pod, container, {**base, **env}


def on_loopback(env: dict[str, str], variable: str) -> tuple[int, int]:
    """Move ``variable``'s 0.0.0.0:PORT to a free loopback port: (pod port, local port)."""
    host, _, port = env[variable].rpartition(":")
    assert host == "0.0.0.0"
    local = free_port()
    env[variable] = f"127.0.0.1:{local}"
    return int(port), local


def call_code(channel: grpc.Channel, token: str) -> grpc.StatusCode:
    stub = pb_grpc.RunServiceStub(channel)
    try:
        stub.GetActive(
            pb.GetActiveRequest(), metadata=[("authorization", f"Bearer {token}")], timeout=10
        )
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.mark.postgres
@pytest.mark.redis
def test_the_job_migrates_and_the_deployment_serves_as_configured(
    empty_database: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    objects = render()
    signing_key = ec_key()
    pki = make_pki()
    secrets = {
        # One database user here; the manifests give the Job a role of its own.
        ("runsvc-database", "url"): empty_database,
        ("runsvc-database-migrate", "url"): empty_database,
        ("runsvc-redis", "url"): redis_url,
        ("runsvc-jwt", "hs256-secret"): HS256_SECRET,
        ("runsvc-jwt", "public-keys.pem"): public_pem(signing_key),
        ("runsvc-tls", "tls.crt"): pki.server_cert_pem.decode(),
        ("runsvc-tls", "tls.key"): private_pem(pki.server_key).decode(),
    }

    _, job, job_env = pod_environment(objects, "Job", secrets, tmp_path / "job")
    migrated = subprocess.run(
        [*runsvc_command(), *job["command"][1:], *job["args"]],
        env=job_env,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT,
        check=False,
    )
    assert migrated.returncode == 0, migrated.stderr
    assert "database at revision" in migrated.stdout

    pod, server, env = pod_environment(objects, "Deployment", secrets, tmp_path / "server")
    assert server["command"] + server["args"] == ["runsvc", "serve"]
    grpc_port, grpc_local = on_loopback(env, "RUNSVC_GRPC_ADDRESS")
    metrics_port, metrics_local = on_loopback(env, "RUNSVC_METRICS_ADDRESS")
    health_port, health_local = on_loopback(env, "RUNSVC_HEALTH_ADDRESS")
    env["RUNSVC_REDIS_KEY_PREFIX"] = redis_prefix
    address = f"127.0.0.1:{grpc_local}"
    # The gRPC port speaks TLS only: the start is seen on the plaintext health port.
    running = spawn_server(
        env, tmp_path / "server", f"127.0.0.1:{health_local}", tmp_path / "server.stderr"
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{health_local}") as probes:
            health = health_pb2_grpc.HealthStub(probes)
            for name in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = server[name]["grpc"]
                assert probe["port"] == health_port != grpc_port
                request = health_pb2.HealthCheckRequest(service=probe.get("service", ""))
                status = health.Check(request, timeout=probe_timeout(server[name]))
                assert status.status == health_pb2.HealthCheckResponse.SERVING, name
        with grpc.insecure_channel(address) as plain:
            assert call_code(plain, "x") == grpc.StatusCode.UNAVAILABLE  # no plaintext
        credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca_pem)
        with grpc.secure_channel(address, credentials) as channel:
            audience = env["RUNSVC_JWT_AUDIENCE"]
            hs256 = tokens.issue(
                HS256_SECRET, role="backend", tenant_id="acme", ttl_seconds=60, audience=audience
            )
            es256 = jwt.encode(claims("backend", "acme", aud=audience), signing_key, "ES256")
            no_audience = jwt.encode(claims("backend", "acme"), signing_key, "ES256")
            assert call_code(channel, hs256) == grpc.StatusCode.NOT_FOUND
            assert call_code(channel, es256) == grpc.StatusCode.NOT_FOUND
            assert call_code(channel, no_audience) == grpc.StatusCode.UNAUTHENTICATED

        (endpoint,) = one(objects, "ServiceMonitor")["spec"]["endpoints"]
        port = next(
            p
            for p in one(objects, "Service", "runsvc-metrics")["spec"]["ports"]
            if p["name"] == endpoint["port"]
        )
        assert {c["name"]: c["containerPort"] for c in server["ports"]}[
            port["targetPort"]
        ] == metrics_port
        url = f"http://127.0.0.1:{metrics_local}{endpoint['path']}"
        with urllib.request.urlopen(url, timeout=10) as scraped:
            body = scraped.read().decode()
        # Read from the migrated database, with the ConfigMap's threshold.
        assert "runsvc_store_up 1.0" in body
        stale_after = float(env["RUNSVC_STALE_AFTER_SECONDS"])
        assert f"runsvc_stale_threshold_seconds {stale_after}" in body

        pause = server["lifecycle"]["preStop"]["sleep"]["seconds"]
        budget = pod["terminationGracePeriodSeconds"] - pause
        started = time.monotonic()
        running.process.send_signal(signal.SIGTERM)
        returncode = running.process.wait(timeout=budget)
        assert returncode == 0, running.stderr()
        assert time.monotonic() - started <= budget
    finally:
        kill(running.process)


def probe_timeout(probe: Manifest) -> float:
    return float(probe.get("timeoutSeconds", 1)) + 5
