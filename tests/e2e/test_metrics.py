"""The exporter of a live server: a worker goes silent, the gauges move, then settle."""

from __future__ import annotations

import io
import json
import logging
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from runsvc.logs import JsonFormatter
from runsvc.server import Server, build
from runsvc.settings import Settings
from runsvc_client.v1 import run_service_pb2 as pb
from runsvc_client.v1 import run_service_pb2_grpc as pb_grpc
from tests import tools
from tests.conftest import UNLIMITED_RATES
from tests.e2e.conftest import SECRET, token
from tests.support.waiting import wait_for

STALE_AFTER = 1.0
BACKEND = token("backend", "t1")
WORKER = token("worker", "t1", subject="w1")

ONE_JOB = [pb.JobSpec(external_id="call-0", payload=b"x")]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def server(db_url: str, tmp_path: Path) -> Iterator[Server]:
    """A server whose reaper waits long, so that only reads end stale runs here."""
    settings = Settings(
        data_dir=tmp_path,
        database_url=db_url,
        grpc_address="127.0.0.1:0",
        metrics_address="127.0.0.1:0",
        stale_after_seconds=STALE_AFTER,
        reap_interval_seconds=3600,
        startup_cleanup_after_seconds=3600,
        jwt_secret=SECRET,
        grpc_max_workers=8,
        rate_limits=UNLIMITED_RATES,
    )
    running = Server(build(settings), secret=SECRET)
    running.start()
    yield running
    running.stop(grace=0)


@pytest.fixture
def stub(server: Server) -> Iterator[pb_grpc.RunServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.RunServiceStub(channel)


def scrape_text(server: Server) -> str:
    assert server.exporter is not None
    url = f"http://127.0.0.1:{server.exporter.port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return str(response.read().decode())


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape(server: Server) -> Samples:
    return parse(scrape_text(server))


def test_a_silent_worker_moves_the_gauges_then_they_settle(
    server: Server, stub: pb_grpc.RunServiceStub
) -> None:
    jobs = [pb.JobSpec(external_id=f"call-{i}", payload=b"x") for i in range(3)]
    run = stub.CreateRun(pb.CreateRunRequest(request_id="r1", jobs=jobs), metadata=BACKEND).run
    claimed = stub.ClaimRun(pb.ClaimRunRequest(worker_id="w1"), metadata=WORKER)
    stub.AcquireJobs(
        pb.AcquireJobsRequest(run_id=run.id, lease_epoch=claimed.lease_epoch, max_jobs=2),
        metadata=WORKER,
    )
    stub.Heartbeat(
        pb.HeartbeatRequest(run_id=run.id, lease_epoch=claimed.lease_epoch), metadata=WORKER
    )

    alive = scrape(server)
    assert value(alive, "runsvc_store_up") == 1
    assert value(alive, "runsvc_runs", state="RUNNING") == 1
    assert value(alive, "runsvc_runs_stale") == 0
    assert 0 <= value(alive, "runsvc_oldest_heartbeat_age_seconds") < STALE_AFTER
    assert value(alive, "runsvc_running_heartbeat_age_seconds_count") == 1
    assert value(alive, "runsvc_heartbeats_total") == 1
    assert value(alive, "runsvc_reaper_last_success_timestamp_seconds") > 0

    # The worker stops heartbeating: the stale gauge and the oldest age move.
    wait_for(lambda: value(scrape(server), "runsvc_runs_stale") == 1, timeout=15, step=0.2)
    silent = scrape(server)
    assert value(silent, "runsvc_oldest_heartbeat_age_seconds") >= STALE_AFTER
    assert value(silent, "runsvc_running_heartbeat_age_seconds_bucket", le="1.0") == 0
    assert value(silent, "runsvc_running_heartbeat_age_seconds_bucket", le="+Inf") == 1
    assert value(silent, "runsvc_runs", state="RUNNING") == 1

    # A read finalizes it: everything returns to zero.
    with pytest.raises(grpc.RpcError) as none:
        stub.GetActive(pb.GetActiveRequest(), metadata=BACKEND)
    assert none.value.code() is grpc.StatusCode.NOT_FOUND
    settled = scrape(server)
    assert value(settled, "runsvc_runs_stale") == 0
    assert value(settled, "runsvc_oldest_heartbeat_age_seconds") == 0
    assert value(settled, "runsvc_running_heartbeat_age_seconds_count") == 0
    assert value(settled, "runsvc_runs", state="RUNNING") == 0
    assert value(settled, "runsvc_runs", state="STOPPED") == 1
    assert (
        value(
            settled,
            "runsvc_run_finalizations_total",
            state="STOPPED",
            reason="HEARTBEAT_TIMEOUT",
            detected_by="read",
        )
        == 1
    )
    assert value(settled, "runsvc_slot_releases_total", cause="run_ended") == 2
    assert value(settled, "runsvc_slot_release_backlog") == 0
    assert value(settled, "runsvc_slot_release_oldest_age_seconds") == 0
    grpc_labels = {"grpc_type": "unary", "grpc_service": "runsvc.v1.RunService"}
    assert (
        value(
            settled,
            "grpc_server_handled_total",
            **grpc_labels,
            grpc_method="GetActive",
            grpc_code="NotFound",
        )
        == 1
    )
    assert (
        value(
            settled,
            "grpc_server_handled_total",
            **grpc_labels,
            grpc_method="Heartbeat",
            grpc_code="OK",
        )
        == 1
    )
    assert (
        value(settled, "grpc_server_handling_seconds_count", **grpc_labels, grpc_method="Heartbeat")
        == 1
    )

    # The old lease is fenced off, and that is counted.
    with pytest.raises(grpc.RpcError) as fenced:
        stub.Heartbeat(
            pb.HeartbeatRequest(run_id=run.id, lease_epoch=claimed.lease_epoch), metadata=WORKER
        )
    assert fenced.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    after = scrape(server)
    assert value(after, "runsvc_fenced_writes_total") == 1
    assert (
        value(
            after,
            "grpc_server_handled_total",
            **grpc_labels,
            grpc_method="Heartbeat",
            grpc_code="FailedPrecondition",
        )
        == 1
    )


def test_promtool_finds_nothing_on_a_real_scrape(
    server: Server, stub: pb_grpc.RunServiceStub
) -> None:
    run = stub.CreateRun(pb.CreateRunRequest(request_id="r1", jobs=ONE_JOB), metadata=BACKEND).run
    stub.ClaimRun(pb.ClaimRunRequest(worker_id="w1"), metadata=WORKER)
    stub.ForceCancel(pb.ForceCancelRequest(run_id=run.id), metadata=BACKEND)
    text = scrape_text(server)
    assert "grpc_server_handled_total" in text and "runsvc_force_cancels_total 1.0" in text
    checked = tools.run("promtool", "check", "metrics", stdin=text)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "" and checked.stderr.strip() == ""


def test_refusals_are_counted_by_kind(server: Server, stub: pb_grpc.RunServiceStub) -> None:
    with pytest.raises(grpc.RpcError):
        stub.GetActive(pb.GetActiveRequest())
    with pytest.raises(grpc.RpcError):
        stub.GetActive(pb.GetActiveRequest(), metadata=WORKER)
    foreign = stub.CreateRun(
        pb.CreateRunRequest(request_id="r2", jobs=ONE_JOB), metadata=token("backend", "t2")
    ).run
    with pytest.raises(grpc.RpcError):
        stub.GetRun(pb.GetRunRequest(run_id=foreign.id), metadata=BACKEND)
    # A run that exists nowhere (a typo) is answered alike but is no security event.
    with pytest.raises(grpc.RpcError):
        stub.GetRun(
            pb.GetRunRequest(run_id="00000000-0000-4000-8000-000000000000"), metadata=BACKEND
        )
    samples = scrape(server)
    for kind in ("unauthenticated", "role", "run_not_visible"):
        assert value(samples, "runsvc_security_denials_total", kind=kind) == 1, kind
    assert (
        value(
            samples,
            "grpc_server_handled_total",
            grpc_type="unary",
            grpc_service="runsvc.v1.RunService",
            grpc_method="GetActive",
            grpc_code="Unauthenticated",
        )
        == 1
    )


def test_log_lines_of_a_call_carry_its_request_id_and_tenant(
    server: Server, stub: pb_grpc.RunServiceStub
) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    audit = logging.getLogger("runsvc.audit")
    audit.addHandler(handler)
    level = audit.level
    audit.setLevel(logging.INFO)
    try:
        run = stub.CreateRun(
            pb.CreateRunRequest(request_id="r1", jobs=ONE_JOB), metadata=BACKEND
        ).run
        stub.ForceCancel(
            pb.ForceCancelRequest(run_id=run.id),
            metadata=[*BACKEND, ("x-request-id", "req-42")],
        )
        foreign = stub.CreateRun(
            pb.CreateRunRequest(request_id="r2", jobs=ONE_JOB), metadata=token("backend", "t2")
        ).run
        with pytest.raises(grpc.RpcError):
            stub.GetRun(
                pb.GetRunRequest(run_id=foreign.id),
                metadata=[*BACKEND, ("x-request-id", "not a sane id!")],
            )
    finally:
        audit.setLevel(level)
        audit.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    ended = [line for line in lines if line.get("tag") == "FORCE_CANCEL"]
    assert len(ended) == 1
    assert ended[0]["request_id"] == "req-42"
    assert ended[0]["tenant"] == "t1"
    assert ended[0]["rpc"] == "/runsvc.v1.RunService/ForceCancel"
    (refused,) = [line for line in lines if line.get("tag") == "SECURITY"]
    # An id that is not a sane token is replaced by a fresh one.
    assert len(refused["request_id"]) == 32 and refused["request_id"] != ended[0]["request_id"]
    assert refused["tenant"] == "t1" and refused["rpc"].endswith("/GetRun")


def test_a_tripped_breaker_is_counted_and_stops_nothing(db_url: str, tmp_path: Path) -> None:
    def settings(reap_interval: float) -> Settings:
        return Settings(
            data_dir=tmp_path,
            database_url=db_url,
            grpc_address="127.0.0.1:0",
            metrics_address="127.0.0.1:0",
            stale_after_seconds=STALE_AFTER,
            reap_interval_seconds=reap_interval,
            startup_cleanup_after_seconds=3600,
            jwt_secret=SECRET,
            grpc_max_workers=8,
        )

    # Four runs whose workers all fall silent, set up on a server whose reaper
    # waits: however slow the set-up, none of them can be reaped one by one.
    setup = Server(build(settings(reap_interval=3600)), secret=SECRET)
    setup.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{setup.port}") as channel:
            stub = pb_grpc.RunServiceStub(channel)
            for i in range(4):
                tenant = f"t{i}"
                stub.CreateRun(
                    pb.CreateRunRequest(request_id="r", jobs=ONE_JOB),
                    metadata=token("backend", tenant),
                )
                stub.ClaimRun(
                    pb.ClaimRunRequest(worker_id=f"w{i}"),
                    metadata=token("worker", tenant, subject=f"w{i}"),
                )
    finally:
        setup.stop(grace=0)
    # A new replica counts silence from its own start, so all four turn stale
    # together under its eager reaper: the breaker must hold every pass back.
    running = Server(build(settings(reap_interval=0.2)), secret=SECRET)
    running.start()
    try:
        assert value(scrape(running), "runsvc_reaper_breaker_trips_total") == 0
        wait_for(
            lambda: value(scrape(running), "runsvc_reaper_breaker_trips_total") >= 2,
            timeout=15,
            step=0.2,
        )
        held = scrape(running)
        assert value(held, "runsvc_runs", state="RUNNING") == 4
        assert value(held, "runsvc_runs", state="STOPPED") == 0
    finally:
        running.stop(grace=0)
