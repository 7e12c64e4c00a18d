"""Every RPC end to end through the generated stubs, against a real server."""

from __future__ import annotations

import time

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runsvc.server import Server
from runsvc_client.v1 import run_service_pb2 as pb
from runsvc_client.v1 import run_service_pb2_grpc as pb_grpc
from tests.e2e.conftest import REAP_INTERVAL, STALE_AFTER, expired_token, token
from tests.support.waiting import wait_for

BACKEND = token("backend", "t1")
WORKER = token("worker", "t1", subject="w1")
OTHER_BACKEND = token("backend", "t2")


def jobs(n: int) -> list[pb.JobSpec]:
    return [pb.JobSpec(external_id=f"call-{i}", payload=b"+9725%04d" % i) for i in range(n)]


def create(stub: pb_grpc.RunServiceStub, n: int = 5, request_id: str = "r1") -> pb.Run:
    response = stub.CreateRun(
        pb.CreateRunRequest(request_id=request_id, jobs=jobs(n)), metadata=BACKEND
    )
    return response.run


def claim(stub: pb_grpc.RunServiceStub, worker: str = "w1") -> pb.ClaimRunResponse:
    return stub.ClaimRun(pb.ClaimRunRequest(worker_id=worker), metadata=WORKER)


def refusal(call: grpc.RpcError) -> tuple[grpc.StatusCode, str, bytes]:
    trailing = dict(call.trailing_metadata() or ())
    return call.code(), call.details(), trailing.get("grpc-status-details-bin", b"")


def error_info(call: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = status_pb2.Status.FromString(refusal(call)[2])
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo in the status")


def test_a_run_from_creation_to_completion(stub: pb_grpc.RunServiceStub) -> None:
    run = create(stub)
    assert create(stub).id == run.id  # idempotent on request_id
    with pytest.raises(grpc.RpcError) as exists:
        create(stub, request_id="r2")
    assert exists.value.code() is grpc.StatusCode.ALREADY_EXISTS
    assert error_info(exists.value).metadata["run_id"] == run.id
    assert stub.GetActive(pb.GetActiveRequest(), metadata=BACKEND).run.id == run.id
    claimed = claim(stub)
    assert claimed.run.id == run.id and claimed.lease_epoch == 1
    assert claimed.run.state == pb.RUN_STATE_RUNNING and claimed.run.worker_id == "w1"
    beat = stub.Heartbeat(pb.HeartbeatRequest(run_id=run.id, lease_epoch=1), metadata=WORKER)
    assert not beat.cancel_requested and beat.stale_time.seconds > 0
    done = 0
    while True:
        got = stub.AcquireJobs(
            pb.AcquireJobsRequest(run_id=run.id, lease_epoch=1, max_jobs=10), metadata=WORKER
        )
        assert len(got.jobs) <= 3  # the tenant's slots
        if not got.jobs:
            break
        reported = stub.ReportJobs(
            pb.ReportJobsRequest(
                run_id=run.id,
                lease_epoch=1,
                results=[
                    pb.JobResult(job_id=j.id, outcome=pb.JOB_OUTCOME_COMPLETED) for j in got.jobs
                ],
            ),
            metadata=WORKER,
        )
        done += reported.recorded
    assert done == 5
    finished = stub.FinishRun(
        pb.FinishRunRequest(run_id=run.id, lease_epoch=1, outcome=pb.RUN_OUTCOME_COMPLETED),
        metadata=WORKER,
    )
    assert finished.run.state == pb.RUN_STATE_COMPLETED
    assert finished.run.job_counts.completed == 5
    assert finished.run.end_time.seconds > 0
    got_run = stub.GetRun(pb.GetRunRequest(run_id=run.id), metadata=BACKEND).run
    assert got_run == finished.run
    listed = stub.ListRuns(pb.ListRunsRequest(), metadata=BACKEND)
    assert [r.id for r in listed.runs] == [run.id] and not listed.next_page_token
    with pytest.raises(grpc.RpcError) as none:
        stub.GetActive(pb.GetActiveRequest(), metadata=BACKEND)
    assert none.value.code() is grpc.StatusCode.NOT_FOUND


def test_a_silent_worker_is_caught_by_the_reaper(stub: pb_grpc.RunServiceStub) -> None:
    run = create(stub)
    claim(stub)
    stub.AcquireJobs(
        pb.AcquireJobsRequest(run_id=run.id, lease_epoch=1, max_jobs=2), metadata=WORKER
    )
    stub.Heartbeat(pb.HeartbeatRequest(run_id=run.id, lease_epoch=1), metadata=WORKER)
    last_beat = time.monotonic()

    def stopped_in_store() -> bool:
        # ListRuns never finalizes on read, so this sees the reaper's work alone.
        runs = stub.ListRuns(pb.ListRunsRequest(), metadata=BACKEND).runs
        return runs[0].state == pb.RUN_STATE_STOPPED

    wait_for(stopped_in_store, timeout=STALE_AFTER + REAP_INTERVAL + 1)
    assert time.monotonic() - last_beat <= STALE_AFTER + REAP_INTERVAL + 1
    with pytest.raises(grpc.RpcError) as none:
        stub.GetActive(pb.GetActiveRequest(), metadata=BACKEND)
    assert none.value.code() is grpc.StatusCode.NOT_FOUND
    ended = stub.GetRun(pb.GetRunRequest(run_id=run.id), metadata=BACKEND).run
    assert ended.stop_reason == "HEARTBEAT_TIMEOUT" and not ended.worker_id
    assert (ended.job_counts.failed, ended.job_counts.queued, ended.job_counts.in_progress) == (
        5,
        0,
        0,
    )


def test_get_active_never_reports_a_silent_run(stub: pb_grpc.RunServiceStub) -> None:
    create(stub)
    claim(stub)
    elapsed = wait_for(lambda: _no_active(stub), timeout=STALE_AFTER + REAP_INTERVAL + 1, step=0.02)
    assert elapsed >= STALE_AFTER - 0.1  # not before the threshold


def _no_active(stub: pb_grpc.RunServiceStub) -> bool:
    try:
        stub.GetActive(pb.GetActiveRequest(), metadata=BACKEND)
    except grpc.RpcError as error:
        assert error.code() is grpc.StatusCode.NOT_FOUND
        return True
    return False


def test_force_cancel_of_a_dead_workers_run_and_the_zombie(stub: pb_grpc.RunServiceStub) -> None:
    run = create(stub, n=6)
    claim(stub)
    stub.AcquireJobs(
        pb.AcquireJobsRequest(run_id=run.id, lease_epoch=1, max_jobs=3), metadata=WORKER
    )
    # Plain cancel only asks; with the worker dead nothing would happen until the reaper.
    asked = stub.Cancel(pb.CancelRequest(run_id=run.id, reason="ui"), metadata=BACKEND).run
    assert asked.state == pb.RUN_STATE_RUNNING and asked.cancel_requested
    forced = stub.ForceCancel(pb.ForceCancelRequest(run_id=run.id, reason="ui"), metadata=BACKEND)
    assert forced.run.state == pb.RUN_STATE_CANCELLED
    assert (forced.cancelled_jobs, forced.released_slots) == (6, 3)
    again = stub.ForceCancel(pb.ForceCancelRequest(run_id=run.id), metadata=BACKEND)
    assert (again.run.state, again.cancelled_jobs) == (pb.RUN_STATE_CANCELLED, 0)
    with pytest.raises(grpc.RpcError) as zombie:
        stub.Heartbeat(pb.HeartbeatRequest(run_id=run.id, lease_epoch=1), metadata=WORKER)
    assert zombie.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(zombie.value)
    assert (info.reason, info.domain) == ("LEASE_LOST", "runsvc.v1")
    create(stub, request_id="r2")  # the tenant is free again


def test_other_tenants_cannot_tell_a_foreign_run_from_a_missing_one(
    stub: pb_grpc.RunServiceStub,
) -> None:
    run = create(stub)
    missing = "00000000-0000-4000-8000-000000000000"
    for rpc, request in (
        ("GetRun", lambda rid: pb.GetRunRequest(run_id=rid)),
        ("Cancel", lambda rid: pb.CancelRequest(run_id=rid)),
        ("ForceCancel", lambda rid: pb.ForceCancelRequest(run_id=rid)),
    ):
        answers = []
        for rid in (run.id, missing):
            with pytest.raises(grpc.RpcError) as refused:
                getattr(stub, rpc)(request(rid), metadata=OTHER_BACKEND)
            answers.append(refusal(refused.value))
        assert answers[0] == answers[1]
        assert answers[0][0] is grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as foreign_claim:
        stub.Heartbeat(
            pb.HeartbeatRequest(run_id=run.id, lease_epoch=1),
            metadata=token("worker", "t2", subject="w1"),
        )
    assert foreign_claim.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert (
        stub.ClaimRun(
            pb.ClaimRunRequest(worker_id="w2"), metadata=token("worker", "t2", subject="w2")
        )
        == pb.ClaimRunResponse()
    )
    still = stub.GetRun(pb.GetRunRequest(run_id=run.id), metadata=BACKEND).run
    assert still.state == pb.RUN_STATE_PENDING and not still.cancel_requested
    with pytest.raises(grpc.RpcError) as other_tenant:
        stub.GetActive(pb.GetActiveRequest(tenant_id="t1"), metadata=OTHER_BACKEND)
    assert other_tenant.value.code() is grpc.StatusCode.PERMISSION_DENIED


def test_a_run_is_named_by_its_number_as_well_as_its_id(stub: pb_grpc.RunServiceStub) -> None:
    first = create(stub, request_id="n1")
    assert first.number >= 1
    by_number = stub.GetRun(pb.GetRunRequest(run_id=str(first.number)), metadata=BACKEND).run
    assert by_number == stub.GetRun(pb.GetRunRequest(run_id=first.id), metadata=BACKEND).run
    cancelled = stub.Cancel(pb.CancelRequest(run_id=str(first.number)), metadata=BACKEND).run
    assert cancelled.id == first.id and cancelled.state == pb.RUN_STATE_CANCELLED
    second = create(stub, request_id="n2")
    assert second.number > first.number
    forced = stub.ForceCancel(pb.ForceCancelRequest(run_id=str(second.number)), metadata=BACKEND)
    assert forced.run.id == second.id and forced.cancelled_jobs == 5
    # Another tenant's number is refused exactly like a number nobody has.
    answers = []
    for ref in (str(second.number), str(second.number + 1000)):
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetRun(pb.GetRunRequest(run_id=ref), metadata=OTHER_BACKEND)
        answers.append(refusal(refused.value))
    assert answers[0] == answers[1]
    assert answers[0][0] is grpc.StatusCode.PERMISSION_DENIED
    for bad in ("0", str(2**63), "-1", "١٢"):
        with pytest.raises(grpc.RpcError) as invalid:
            stub.GetRun(pb.GetRunRequest(run_id=bad), metadata=BACKEND)
        assert invalid.value.code() is grpc.StatusCode.INVALID_ARGUMENT, bad


@pytest.mark.parametrize(
    "metadata",
    [
        [],
        expired_token(),
        [("authorization", "Bearer not-a-jwt")],
        [("authorization", "Basic dXNlcjpwYXNz")],
    ],
    ids=["missing", "expired", "garbage", "not-bearer"],
)
def test_a_missing_or_bad_token_is_unauthenticated(
    stub: pb_grpc.RunServiceStub, metadata: list[tuple[str, str]]
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        stub.GetActive(pb.GetActiveRequest(), metadata=metadata)
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_roles_are_enforced(stub: pb_grpc.RunServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as worker_creates:
        stub.CreateRun(pb.CreateRunRequest(request_id="x", jobs=jobs(1)), metadata=WORKER)
    assert worker_creates.value.code() is grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as backend_claims:
        stub.ClaimRun(pb.ClaimRunRequest(worker_id="w"), metadata=BACKEND)
    assert backend_claims.value.code() is grpc.StatusCode.PERMISSION_DENIED
    admin = token("admin")
    run = stub.CreateRun(
        pb.CreateRunRequest(request_id="adm", jobs=jobs(1), tenant_id="t9"), metadata=admin
    ).run
    assert run.tenant_id == "t9"
    assert stub.GetRun(pb.GetRunRequest(run_id=run.id), metadata=admin).run.id == run.id


def test_bad_input_is_invalid_argument_with_field_violations(
    stub: pb_grpc.RunServiceStub,
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        stub.CreateRun(pb.CreateRunRequest(request_id="", jobs=[]), metadata=BACKEND)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    status = status_pb2.Status.FromString(refusal(refused.value)[2])
    fields = set()
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = {v.field for v in bad.field_violations}
    assert fields == {"request_id", "jobs"}
    with pytest.raises(grpc.RpcError) as no_outcome:
        stub.FinishRun(
            pb.FinishRunRequest(run_id="00000000-0000-4000-8000-000000000000", lease_epoch=1),
            metadata=WORKER,
        )
    assert no_outcome.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError):
        stub.GetActive(pb.GetActiveRequest(), metadata=BACKEND)  # still nothing created


def test_health(channel: grpc.Channel, server: Server) -> None:
    """Reflection, off by default, is tested with the other open services."""
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "runsvc.v1.RunService"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=name))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
