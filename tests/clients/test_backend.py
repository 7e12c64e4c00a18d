"""BackendClient against a real server, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from runsvc.server import Server
from runsvc_client import (
    AlreadyExists,
    BackendClient,
    JobSpec,
    PermissionDenied,
    RetryPolicy,
    RunState,
    WorkerClient,
    errors,
)
from tests.clients.conftest import address, token
from tests.support.proxy import TcpProxy


def specs(n: int) -> list[JobSpec]:
    return [JobSpec(f"call-{i}", b"+9725%04d" % i) for i in range(n)]


@pytest.fixture
def backend(server: Server) -> Iterator[BackendClient]:
    with BackendClient(address(server), token=token("backend")) as client:
        yield client


def test_active_run_create_get_cancel(backend: BackendClient, server: Server) -> None:
    assert backend.get_active() is None
    run = backend.create_run(specs(3), request_id="req-1")
    assert run.state is RunState.PENDING and run.job_counts.total == 3
    assert backend.create_run(specs(3), request_id="req-1").id == run.id  # idempotent
    with pytest.raises(AlreadyExists) as exists:
        backend.create_run(specs(1), request_id="req-2")
    assert exists.value.run_id == run.id and exists.value.reason == "ACTIVE_RUN_EXISTS"
    assert isinstance(exists.value.__cause__, grpc.RpcError)
    active = backend.get_active()
    assert active is not None and active.id == run.id
    assert backend.get_run(run.id).request_id == "req-1"
    cancelled = backend.cancel(run.id, reason="user asked")
    assert cancelled.state is RunState.CANCELLED  # a pending run ends at once
    assert cancelled.cancel_reason == "user asked"
    assert backend.get_active() is None


def test_force_cancel_counts_jobs_and_hides_other_tenants(
    backend: BackendClient, server: Server
) -> None:
    run = backend.create_run(specs(4), request_id="req-1")
    with WorkerClient(
        address(server), token=token("worker", subject="w1"), worker_id="w1"
    ) as worker:
        lease = worker.claim()
        assert lease is not None and lease.run_id == run.id
    with BackendClient(address(server), token=token("backend", "t2")) as other:
        with pytest.raises(PermissionDenied) as denied:
            other.force_cancel(run.id)
        assert denied.value.reason == "PERMISSION_DENIED"
    done = backend.force_cancel(run.id, reason="worker is dead")
    assert done.run.state is RunState.CANCELLED and done.cancelled_jobs == 4
    assert backend.force_cancel(run.id).cancelled_jobs == 0  # idempotent


def test_list_runs_iterates_every_page(backend: BackendClient) -> None:
    ids = []
    for i in range(5):
        ids.append(backend.create_run(specs(1), request_id=f"req-{i}").id)
        backend.cancel(ids[-1])
    listed = [run.id for run in backend.list_runs(page_size=2)]
    assert listed == list(reversed(ids))  # newest first, across three pages
    assert list(backend.list_runs(states=[RunState.RUNNING])) == []


def test_bad_input_and_bad_token(backend: BackendClient, server: Server) -> None:
    with pytest.raises(errors.InvalidArgument) as invalid:
        backend.create_run([], request_id="")
    assert invalid.value.field_violations
    assert invalid.value.reason == "INVALID_ARGUMENT"
    with BackendClient(address(server), token="not-a-token") as anonymous:
        with pytest.raises(errors.Unauthenticated):
            anonymous.get_active()


def test_every_status_code_has_its_class() -> None:
    for code in grpc.StatusCode:
        if code is grpc.StatusCode.OK:
            continue
        assert errors.ERRORS_BY_CODE[code].code is code


class CountingInterceptor(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self) -> None:
        self.calls: list[str] = []

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        self.calls.append(details.method.rsplit("/", 1)[-1])
        return continuation(details, request)


def test_reads_are_retried_and_force_cancel_is_not(server: Server) -> None:
    with TcpProxy(upstream=("127.0.0.1", server.port)) as proxy:
        counter = CountingInterceptor()
        channel = grpc.intercept_channel(grpc.insecure_channel(proxy.address), counter)
        retry = RetryPolicy(attempts=3, initial_backoff=0.05, max_backoff=0.1)
        client = BackendClient(channel, token=token("backend"), timeout=0.3, retry=retry)
        assert client.get_active() is None
        proxy.blackhole()
        with pytest.raises(errors.DeadlineExceeded):
            client.get_active()
        with pytest.raises(errors.DeadlineExceeded):
            client.force_cancel("0" * 32)
        proxy.restore()
        assert counter.calls == ["GetActive"] + ["GetActive"] * 3 + ["ForceCancel"]
        channel.close()
