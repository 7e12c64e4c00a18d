"""Every input edge is strict, on both engines: control characters, oversized lists,
unbounded error replies, forged page tokens and loose token claims are refused with a
clear status, and change nothing."""

from __future__ import annotations

import base64
import logging
import time
import uuid
from pathlib import Path

import grpc
import jwt
import pytest
from google.rpc import error_details_pb2, status_pb2
from sqlalchemy import select
from sqlalchemy.engine import make_url

from runsvc.errors import MAX_VIOLATIONS
from runsvc.server import Server, build
from runsvc.settings import Settings
from runsvc.store.schema import jobs
from runsvc_client.v1 import run_service_pb2 as pb
from runsvc_client.v1 import run_service_pb2_grpc as pb_grpc
from tests.e2e.conftest import SECRET, token

BACKEND = token("backend", "t1")
WORKER = token("worker", "t1", subject="w1")
# gRPC's default limit on the metadata a client accepts: an error reply must stay far below.
CLIENT_METADATA_LIMIT = 8 * 1024


def refusal(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as refused:
        call()  # type: ignore[operator]
    return refused.value


def details(error: grpc.RpcError) -> tuple[status_pb2.Status, int]:
    raw = dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
    status = status_pb2.Status()
    status.ParseFromString(raw)
    return status, len(raw) + len(error.details() or "")


def violations(status: status_pb2.Status) -> tuple[list[str], dict[str, str]]:
    fields, info = [], {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = [v.field for v in bad.field_violations]
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            error_info = error_details_pb2.ErrorInfo()
            detail.Unpack(error_info)
            info = dict(error_info.metadata)
    return fields, info


def create(stub: pb_grpc.RunServiceStub, request_id: str = "r1", jobs: int = 2) -> pb.Run:
    specs = [pb.JobSpec(external_id=f"c{i}") for i in range(jobs)]
    return stub.CreateRun(
        pb.CreateRunRequest(request_id=request_id, jobs=specs), metadata=BACKEND, timeout=10
    ).run


@pytest.mark.parametrize("text", ["a\x00b", "\x00", "line\nforged", "bell\x07", "esc\x1b[2J"])
def test_control_characters_in_free_text_are_invalid_and_change_nothing(
    stub: pb_grpc.RunServiceStub, text: str
) -> None:
    run = create(stub)
    for call in (
        lambda: stub.Cancel(pb.CancelRequest(run_id=run.id, reason=text), metadata=BACKEND),
        lambda: stub.ForceCancel(
            pb.ForceCancelRequest(run_id=run.id, reason=text), metadata=BACKEND
        ),
    ):
        error = refusal(call)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert violations(details(error)[0])[0] == ["reason"]
    claim = stub.ClaimRun(pb.ClaimRunRequest(worker_id="w1"), metadata=WORKER, timeout=10)
    [job] = stub.AcquireJobs(
        pb.AcquireJobsRequest(run_id=run.id, lease_epoch=claim.lease_epoch, max_jobs=1),
        metadata=WORKER,
    ).jobs
    bad = pb.JobResult(job_id=job.id, outcome=pb.JOB_OUTCOME_FAILED, error=text)
    error = refusal(
        lambda: stub.ReportJobs(
            pb.ReportJobsRequest(run_id=run.id, lease_epoch=claim.lease_epoch, results=[bad]),
            metadata=WORKER,
        )
    )
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    error = refusal(
        lambda: stub.FinishRun(
            pb.FinishRunRequest(
                run_id=run.id,
                lease_epoch=claim.lease_epoch,
                outcome=pb.RUN_OUTCOME_FAILED,
                error=text,
            ),
            metadata=WORKER,
        )
    )
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    after = stub.GetRun(pb.GetRunRequest(run_id=run.id), metadata=BACKEND).run
    assert (after.state, after.job_counts.in_progress) == (pb.RUN_STATE_RUNNING, 1)


def test_error_replies_are_bounded_whatever_the_number_of_problems(
    stub: pb_grpc.RunServiceStub, server: Server
) -> None:
    # 200 duplicate external ids: 199 problems, one bounded reply a default client reads.
    specs = [pb.JobSpec(external_id="same") for _ in range(200)]
    error = refusal(
        lambda: stub.CreateRun(
            pb.CreateRunRequest(request_id="dup", jobs=specs), metadata=BACKEND, timeout=10
        )
    )
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    status, size = details(error)
    fields, info = violations(status)
    assert len(fields) == MAX_VIOLATIONS and info["violations"] == "199"
    assert size < CLIENT_METADATA_LIMIT // 2, size
    assert "199 in all" in (error.details() or "")
    # Results without an outcome, as many as a call may carry: ten listed, the total given.
    results = [pb.JobResult(job_id=str(uuid.uuid4())) for _ in range(1000)]
    request = pb.ReportJobsRequest(run_id=str(uuid.uuid4()), lease_epoch=1, results=results)
    error = refusal(lambda: stub.ReportJobs(request, metadata=WORKER, timeout=10))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    status, size = details(error)
    fields, info = violations(status)
    assert len(fields) == MAX_VIOLATIONS and info["violations"] == "1000"
    assert size < CLIENT_METADATA_LIMIT // 2, size
    # Results of 1000 jobs of the run that this lease never took: FAILED_PRECONDITION, with
    # ten of their ids listed and the count.
    run = create(stub, request_id="not-held", jobs=1000)
    claim = stub.ClaimRun(pb.ClaimRunRequest(worker_id="w1"), metadata=WORKER, timeout=10)
    with server.components.db.engine.connect() as conn:
        queued = [r.id for r in conn.execute(select(jobs.c.id).where(jobs.c.run_id == run.id))]
    results = [pb.JobResult(job_id=j, outcome=pb.JOB_OUTCOME_COMPLETED) for j in queued]
    request = pb.ReportJobsRequest(run_id=run.id, lease_epoch=claim.lease_epoch, results=results)
    error = refusal(lambda: stub.ReportJobs(request, metadata=WORKER, timeout=10))
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION, error.details()
    status, size = details(error)
    _, info = violations(status)
    assert len(info["job_ids"].split(",")) == MAX_VIOLATIONS and info["job_count"] == "1000"
    assert size < CLIENT_METADATA_LIMIT // 2, size


def test_oversized_repeated_fields_are_refused_before_they_are_read(
    stub: pb_grpc.RunServiceStub,
) -> None:
    many_results = pb.ReportJobsRequest(
        run_id=str(uuid.uuid4()),
        lease_epoch=1,
        results=[pb.JobResult(job_id="x") for _ in range(100_000)],
    )
    error = refusal(lambda: stub.ReportJobs(many_results, metadata=WORKER, timeout=30))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert violations(details(error)[0])[0] == ["results"]
    # The same state asked for 250,000 times: refused at once, not 250,000 conversions.
    states = pb.ListRunsRequest(states=[pb.RUN_STATE_PENDING] * 250_000)
    error = refusal(lambda: stub.ListRuns(states, metadata=BACKEND, timeout=30))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert violations(details(error)[0])[0] == ["states"]
    # Asking twice for one state is still fine.
    run = create(stub)
    twice = pb.ListRunsRequest(states=[pb.RUN_STATE_PENDING, pb.RUN_STATE_PENDING])
    assert [r.id for r in stub.ListRuns(twice, metadata=BACKEND).runs] == [run.id]


def test_page_tokens_are_signed(stub: pb_grpc.RunServiceStub) -> None:
    for i in range(3):  # one active run per tenant: each ended before the next
        run = create(stub, f"r{i}")
        stub.ForceCancel(pb.ForceCancelRequest(run_id=run.id), metadata=BACKEND)
    first = stub.ListRuns(pb.ListRunsRequest(page_size=1), metadata=BACKEND)
    assert first.next_page_token
    second = stub.ListRuns(
        pb.ListRunsRequest(page_size=1, page_token=first.next_page_token), metadata=BACKEND
    )
    assert second.runs and second.runs[0].id != first.runs[0].id
    any_id = str(uuid.uuid4())
    forged = [
        base64.urlsafe_b64encode(f"2026-01-01T00:00:00|{any_id}".encode()).decode(),
        base64.urlsafe_b64encode(f"9999-12-31T23:59:59+23:59|{any_id}".encode()).decode(),
        first.next_page_token[:-4] + "AAAA",
        "not base64 at all!",
        "é",
    ]
    for page_token in forged:
        error = refusal(
            lambda t=page_token: stub.ListRuns(pb.ListRunsRequest(page_token=t), metadata=BACKEND)
        )
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, (page_token, error.details())
        assert violations(details(error)[0])[0] == ["page_token"]


def _signed(**claims: object) -> list[tuple[str, str]]:
    now = int(time.time())
    issued = jwt.encode({"iat": now, "exp": now + 300, **claims}, SECRET, algorithm="HS256")
    return [("authorization", f"Bearer {issued}")]


def test_loose_token_claims_are_unauthenticated(stub: pb_grpc.RunServiceStub) -> None:
    run = create(stub)
    other_tenant = token("backend", "t2")
    stub.CreateRun(
        pb.CreateRunRequest(request_id="b", jobs=[pb.JobSpec(external_id="c")]),
        metadata=other_tenant,
    )
    loose = {
        "an admin pinned to another tenant": _signed(sub="ops", role="admin", tenant="t2"),
        "an empty tenant": _signed(sub="w9", role="worker", tenant=""),
        "a worker with no sub": _signed(role="worker", tenant="t1"),
        "a worker named like another's process": _signed(sub="w1/2", role="worker", tenant="t1"),
        "a role that is a list": _signed(sub="ops", role=["admin"]),
        "a NUL in the subject": _signed(sub="w\x001", role="worker", tenant="t1"),
        "a week-long token": _signed(
            sub="b", role="backend", tenant="t1", exp=int(time.time()) + 7 * 86400
        ),
    }
    for name, metadata in loose.items():
        for call in (
            lambda m=metadata: stub.GetRun(pb.GetRunRequest(run_id=run.id), metadata=m),
            lambda m=metadata: stub.ClaimRun(pb.ClaimRunRequest(worker_id="w9"), metadata=m),
        ):
            error = refusal(call)
            assert error.code() is grpc.StatusCode.UNAUTHENTICATED, (name, error.code())
            assert error.details() == "authentication required"
    # Nothing was claimed by any of them.
    assert stub.GetRun(pb.GetRunRequest(run_id=run.id), metadata=BACKEND).run.state == (
        pb.RUN_STATE_PENDING
    )


@pytest.mark.postgres
def test_database_details_stay_in_the_log(
    postgres_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A store that refuses the server's role: the caller learns only that it is down."""
    wrong_role = make_url(postgres_url).set(username="no_such_role_here")
    settings = Settings(
        data_dir=tmp_path,
        database_url=wrong_role.render_as_string(hide_password=False),
        grpc_address="127.0.0.1:0",
        jwt_secret=SECRET,
        metrics_address=None,
    )
    server = Server(build(settings), secret=SECRET, startup_cleanup=False)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.RunServiceStub(channel)
            with caplog.at_level(logging.WARNING, logger="runsvc.store.engine"):
                error = refusal(
                    lambda: stub.GetActive(pb.GetActiveRequest(), metadata=BACKEND, timeout=10)
                )
    finally:
        server.stop(grace=0)
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    told = (error.details() or "") + repr(details(error)[0])
    for secret_detail in ("no_such_role_here", "127.0.0.1", "5432", "role", "connection to"):
        assert secret_detail not in told, told
    # The operator still has it, in the log line's fields.
    assert any("no_such_role_here" in getattr(r, "error", "") for r in caplog.records)
