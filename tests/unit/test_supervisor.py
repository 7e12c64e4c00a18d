"""The supervisor's pure rules: what several processes can share, metrics ports, backoff."""

from __future__ import annotations

import pytest

from runsvc.settings import Settings, SettingsError
from runsvc.supervisor import RestartPolicy, check_shareable, metrics_address

PG = "postgresql+psycopg2://runsvc@db/runsvc"


def test_one_process_is_always_fine() -> None:
    check_shareable(Settings(grpc_address="127.0.0.1:0"), 1)  # port 0 and SQLite: one process


def test_several_processes_share_an_explicit_port_on_postgresql() -> None:
    check_shareable(Settings(grpc_address="0.0.0.0:50051", database_url=PG), 8)


@pytest.mark.parametrize(
    ("settings", "workers", "message"),
    [
        (Settings(grpc_address="127.0.0.1:0", database_url=PG), 2, "explicit port"),
        (Settings(grpc_address="127.0.0.1:50051"), 2, "needs PostgreSQL"),
        (
            Settings(grpc_address="127.0.0.1:50051", database_url=PG, metrics_address="h:65535"),
            2,
            "65536 is not a port",
        ),
        (Settings(grpc_address="127.0.0.1:50051", database_url=PG), 0, "between 1 and 64"),
        (Settings(grpc_address="127.0.0.1:50051", database_url=PG), 65, "between 1 and 64"),
    ],
)
def test_what_cannot_be_shared_is_refused(settings: Settings, workers: int, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        check_shareable(settings, workers)


def test_every_problem_is_named_at_once() -> None:
    with pytest.raises(SettingsError) as refused:
        check_shareable(Settings(grpc_address="127.0.0.1:0"), 3)
    assert "explicit port" in str(refused.value) and "PostgreSQL" in str(refused.value)


def test_process_i_serves_metrics_on_the_port_plus_i() -> None:
    assert metrics_address("127.0.0.1:9464", 0) == "127.0.0.1:9464"
    assert metrics_address("127.0.0.1:9464", 3) == "127.0.0.1:9467"
    assert metrics_address("[::1]:9464", 1) == "[::1]:9465"
    assert metrics_address("127.0.0.1:0", 2) == "127.0.0.1:0"  # each picks a free one
    assert metrics_address(None, 2) == "off"


def test_backoff_doubles_per_crash_up_to_the_cap() -> None:
    policy = RestartPolicy(initial_backoff=0.5, max_backoff=30.0)
    assert [policy.backoff(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert policy.backoff(20) == 30.0
