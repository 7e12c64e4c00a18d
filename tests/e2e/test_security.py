"""Authorization matrix and tenant isolation, for every RPC of the service descriptor.

Every RPC is called by every kind of caller — no token, bad tokens of each
kind, and each role of the right and of the wrong tenant — and the exact
status code is asserted; after every refusal no run or job row has changed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest

from runsvc.api.auth import SERVICE
from runsvc.server import Server
from runsvc_client.v1 import run_service_pb2 as pb
from runsvc_client.v1 import run_service_pb2_grpc as pb_grpc
from tests.e2e.security_server import (
    AUDIENCE,
    ISSUER,
    SECRET,
    SIGNING_KEY,
    audit_rows,
    bearer,
    es256,
    missing_id,
    plain_channel,
    serving,
    settings_for,
    snapshot,
)
from tests.keys import claims, ec_key, unsigned

OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION

WORKER_T1 = es256("worker", "t1", subject="w1")
BACKEND_T1 = es256("backend", "t1")
ADMIN = es256("admin")


def _bad_tokens() -> dict[str, list[tuple[str, str]]]:
    now = int(time.time())
    good = claims("admin", iss=ISSUER, aud=AUDIENCE)
    return {
        "no token": [],
        "not a bearer": [("authorization", "Basic dXNlcjpwYXNz")],
        "garbage": bearer("not.a.jwt"),
        "expired": bearer(
            jwt.encode({**good, "iat": now - 900, "exp": now - 600}, SIGNING_KEY, algorithm="ES256")
        ),
        "not yet valid": bearer(
            jwt.encode({**good, "nbf": now + 600}, SIGNING_KEY, algorithm="ES256")
        ),
        "wrong audience": bearer(
            jwt.encode({**good, "aud": "another-service"}, SIGNING_KEY, algorithm="ES256")
        ),
        "wrong issuer": bearer(
            jwt.encode({**good, "iss": "https://evil.test"}, SIGNING_KEY, algorithm="ES256")
        ),
        "alg none": bearer(unsigned(good)),
        "another key": bearer(jwt.encode(good, ec_key(), algorithm="ES256")),
        "another secret": bearer(jwt.encode(good, "y" * 48, algorithm="HS256")),
        "HS256 without audience": bearer(
            jwt.encode(claims("admin", iss=ISSUER), SECRET, algorithm="HS256")
        ),
    }


# Callers that authenticate; the expected code of each cell is in EXPECTED.
CALLERS: dict[str, list[tuple[str, str]]] = {
    "worker t1 (holder)": WORKER_T1,
    "worker t1 (other identity)": es256("worker", "t1", subject="w9"),
    "worker t2": es256("worker", "t2", subject="w1"),
    "fleet worker (other identity)": es256("worker", None, subject="fleet"),
    "backend t1": BACKEND_T1,
    "backend t2": es256("backend", "t2"),
    "admin": ADMIN,
    "admin (HS256)": bearer(
        jwt.encode(claims("admin", iss=ISSUER, aud=AUDIENCE), SECRET, algorithm="HS256")
    ),
}


class World:
    """t1 has an ended run (``ended``) and a running one (``run``) held by w1 at epoch 1,
    with one job (``job``) taken and reported; t2 has nothing."""

    def __init__(self, stub: pb_grpc.RunServiceStub) -> None:
        jobs = [pb.JobSpec(external_id=f"c{i}", payload=b"x") for i in range(3)]
        ended = stub.CreateRun(pb.CreateRunRequest(request_id="r0", jobs=jobs), metadata=BACKEND_T1)
        stub.ForceCancel(pb.ForceCancelRequest(run_id=ended.run.id), metadata=BACKEND_T1)
        self.ended = ended.run.id
        self.run = stub.CreateRun(
            pb.CreateRunRequest(request_id="r1", jobs=jobs), metadata=BACKEND_T1
        ).run.id
        claim = stub.ClaimRun(pb.ClaimRunRequest(worker_id="w1"), metadata=WORKER_T1)
        assert claim.run.id == self.run and claim.lease_epoch == 1
        [job] = stub.AcquireJobs(
            pb.AcquireJobsRequest(run_id=self.run, lease_epoch=1, max_jobs=1), metadata=WORKER_T1
        ).jobs
        self.job = job.id
        stub.ReportJobs(self.report(), metadata=WORKER_T1)

    def report(self, run_id: str | None = None) -> pb.ReportJobsRequest:
        return pb.ReportJobsRequest(
            run_id=run_id or self.run,
            lease_epoch=1,
            results=[pb.JobResult(job_id=self.job, outcome=pb.JOB_OUTCOME_COMPLETED)],
        )

    def requests(self) -> dict[str, Any]:
        """One request per RPC, aimed at t1's runs; harmless for the callers it is allowed to."""
        return {
            "CreateRun": pb.CreateRunRequest(
                request_id="r1", tenant_id="t1", jobs=[pb.JobSpec(external_id="c0")]
            ),
            "ClaimRun": pb.ClaimRunRequest(worker_id="w1/second-process"),
            "Heartbeat": pb.HeartbeatRequest(run_id=self.run, lease_epoch=1),
            "AcquireJobs": pb.AcquireJobsRequest(run_id=self.run, lease_epoch=1, max_jobs=1),
            "ReportJobs": self.report(),
            "FinishRun": pb.FinishRunRequest(
                run_id=self.run, lease_epoch=1, outcome=pb.RUN_OUTCOME_COMPLETED
            ),
            "GetActive": pb.GetActiveRequest(tenant_id="t1"),
            "GetRun": pb.GetRunRequest(run_id=self.run),
            "ListRuns": pb.ListRunsRequest(tenant_id="t1"),
            "Cancel": pb.CancelRequest(run_id=self.ended),
            "ForceCancel": pb.ForceCancelRequest(run_id=self.ended),
        }


BACKEND_RPCS = ("CreateRun", "GetActive", "GetRun", "ListRuns", "Cancel", "ForceCancel")
WORKER_RPCS = ("ClaimRun", "Heartbeat", "AcquireJobs", "ReportJobs", "FinishRun")


def _expected() -> dict[tuple[str, str], grpc.StatusCode]:
    table: dict[tuple[str, str], grpc.StatusCode] = {}
    for caller in CALLERS:
        for rpc in BACKEND_RPCS + WORKER_RPCS:
            table[(caller, rpc)] = DENIED
    for caller in ("backend t1", "admin", "admin (HS256)"):
        for rpc in BACKEND_RPCS:
            table[(caller, rpc)] = OK
    # The holder may act on its run; FinishRun COMPLETED is refused while jobs remain.
    for rpc in ("ClaimRun", "Heartbeat", "AcquireJobs", "ReportJobs"):
        table[("worker t1 (holder)", rpc)] = OK
    table[("worker t1 (holder)", "FinishRun")] = PRECONDITION
    # A worker of another tenant may claim: it just finds none of t1's runs.
    table[("worker t2", "ClaimRun")] = OK
    return table


EXPECTED = _expected()


@pytest.fixture
def secured(db_url: str, tmp_path: Path) -> Iterator[Server]:
    with serving(settings_for(db_url, tmp_path)) as server:
        yield server


@pytest.fixture
def stub(secured: Server) -> Iterator[pb_grpc.RunServiceStub]:
    with plain_channel(secured) as channel:
        yield pb_grpc.RunServiceStub(channel)


def call(
    stub: pb_grpc.RunServiceStub, rpc: str, request: Any, metadata: Any
) -> grpc.RpcError | Any:
    try:
        return getattr(stub, rpc)(request, metadata=metadata, timeout=10)
    except grpc.RpcError as error:
        return error


def code_of(answer: Any) -> grpc.StatusCode:
    return answer.code() if isinstance(answer, grpc.RpcError) else OK


def test_the_matrix_covers_every_rpc_of_the_descriptor() -> None:
    methods = set(pb.DESCRIPTOR.services_by_name["RunService"].methods_by_name)
    assert set(BACKEND_RPCS + WORKER_RPCS) == methods
    assert pb.DESCRIPTOR.services_by_name["RunService"].full_name == SERVICE


def test_authorization_matrix(stub: pb_grpc.RunServiceStub, db_url: str) -> None:
    world = World(stub)
    requests = world.requests()
    assert set(requests) == set(BACKEND_RPCS + WORKER_RPCS)
    mismatches = []
    for rpc, request in requests.items():
        for name, metadata in _bad_tokens().items():
            before = snapshot(db_url)
            answer = call(stub, rpc, request, metadata)
            if code_of(answer) is not UNAUTHENTICATED:
                mismatches.append((rpc, name, code_of(answer)))
            else:
                assert answer.details() == "authentication required"
                assert snapshot(db_url) == before, (rpc, name)
        for name, metadata in CALLERS.items():
            before = snapshot(db_url)
            answer = call(stub, rpc, request, metadata)
            if code_of(answer) is not EXPECTED[(name, rpc)]:
                mismatches.append((rpc, name, code_of(answer)))
            elif code_of(answer) is not OK:
                assert snapshot(db_url) == before, (rpc, name)
    assert mismatches == []
    denials = [r for r in audit_rows(db_url) if r["tag"] == "SECURITY"]
    assert {r["action"] for r in denials} >= {"ROLE_DENIED", "RUN_NOT_VISIBLE", "PERMISSION_DENIED"}


def _status_bytes(error: grpc.RpcError) -> bytes:
    return dict(error.trailing_metadata() or ()).get("grpc-status-details-bin", b"")


def test_a_foreign_run_and_a_missing_run_get_identical_answers(
    stub: pb_grpc.RunServiceStub, db_url: str
) -> None:
    world = World(stub)
    backend_t2 = es256("backend", "t2", subject="intruder-backend")
    worker_t2 = es256("worker", "t2", subject="intruder-worker")
    calls: dict[str, tuple[Callable[[str], Any], Any]] = {
        "GetRun": (lambda rid: pb.GetRunRequest(run_id=rid), backend_t2),
        "Cancel": (lambda rid: pb.CancelRequest(run_id=rid, reason="x"), backend_t2),
        "ForceCancel": (lambda rid: pb.ForceCancelRequest(run_id=rid), backend_t2),
        "Heartbeat": (lambda rid: pb.HeartbeatRequest(run_id=rid, lease_epoch=1), worker_t2),
        "AcquireJobs": (
            lambda rid: pb.AcquireJobsRequest(run_id=rid, lease_epoch=1, max_jobs=1),
            worker_t2,
        ),
        "ReportJobs": (world.report, worker_t2),
        "FinishRun": (
            lambda rid: pb.FinishRunRequest(
                run_id=rid, lease_epoch=1, outcome=pb.RUN_OUTCOME_FAILED
            ),
            worker_t2,
        ),
    }
    takes_run_id = {
        m.name
        for m in pb.DESCRIPTOR.services_by_name["RunService"].methods
        if "run_id" in m.input_type.fields_by_name
    }
    assert set(calls) == takes_run_id
    before = snapshot(db_url)
    probes: list[str] = []
    for rpc, (make, metadata) in calls.items():
        answers = []
        for run_id in (world.run, missing_id(), world.ended):
            probes.append(run_id)
            answer = call(stub, rpc, make(run_id), metadata)
            assert isinstance(answer, grpc.RpcError), rpc
            answers.append((answer.code(), answer.details(), _status_bytes(answer)))
        assert answers[0] == answers[1] == answers[2], rpc
        assert answers[0][0] is DENIED
    assert snapshot(db_url) == before
    # The answers are identical; the audit trail, internal, tells the two apart: another
    # tenant's run is a SECURITY event, an id that exists nowhere (a typo) is not.
    rows = audit_rows(db_url)
    seen = {(r["tag"], r["action"], r["run_id"], r["actor"], r["tenant_id"]) for r in rows}
    for run_id, rpc in zip(probes, [rpc for rpc in calls for _ in range(3)], strict=True):
        actor = "intruder-backend" if calls[rpc][1] is backend_t2 else "intruder-worker"
        if run_id in (world.run, world.ended):
            assert ("SECURITY", "RUN_NOT_VISIBLE", run_id, actor, "t2") in seen, (rpc, run_id)
        else:
            assert ("LOOKUP", "RUN_NOT_FOUND", run_id, actor, "t2") in seen, (rpc, run_id)
            assert not [r for r in rows if r["run_id"] == run_id and r["tag"] == "SECURITY"]
    refusals = [r for r in rows if r["action"] in {"RUN_NOT_VISIBLE", "RUN_NOT_FOUND"}]
    assert all(json.loads(r["detail"])["scope"] == "t2" for r in refusals)


def test_a_worker_cannot_touch_a_run_held_by_another_identity(
    stub: pb_grpc.RunServiceStub, db_url: str
) -> None:
    world = World(stub)
    other = es256("worker", "t1", subject="w9")
    before = snapshot(db_url)
    for rpc, request in world.requests().items():
        if rpc in WORKER_RPCS:
            assert code_of(call(stub, rpc, request, other)) is DENIED, rpc
    # Not even by naming the holder's worker_id, nor a process of it.
    for worker_id in ("w1", "w1/restarted", "w"):
        answer = call(stub, "ClaimRun", pb.ClaimRunRequest(worker_id=worker_id), other)
        assert code_of(answer) is DENIED
    assert snapshot(db_url) == before
    # The holder's own processes ("w1/…") may resume its run.
    resumed = stub.ClaimRun(pb.ClaimRunRequest(worker_id="w1"), metadata=WORKER_T1)
    assert resumed.run.id == world.run and resumed.resumed


def test_token_failures_are_audited_in_aggregate(secured: Server, db_url: str) -> None:
    with plain_channel(secured) as channel:
        stub = pb_grpc.RunServiceStub(channel)
        for _ in range(50):
            answer = call(stub, "GetActive", pb.GetActiveRequest(), bearer("forged"))
            assert code_of(answer) is UNAUTHENTICATED
    secured.audit.flush()
    rows = [r for r in audit_rows(db_url) if r["action"] == "TOKEN_REFUSED"]
    assert 1 <= len(rows) <= 5  # a few windows at most, never one row per refusal
    assert sum(json.loads(r["detail"])["count"] for r in rows) == 50
