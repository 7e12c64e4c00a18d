"""JSON log lines: one object per line, audit fields at the top level."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest

from runsvc import logs
from runsvc.logs import JsonFormatter


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("tests.unit.logs")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    yield log, stream
    log.removeHandler(handler)
    log.propagate = True


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_one_json_object_per_line(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = logger
    log.info("first")
    log.warning("second\nspans lines")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("third")
    records = lines(stream)
    assert [r["message"] for r in records] == ["first", "second\nspans lines", "third"]
    assert [r["level"] for r in records] == ["INFO", "WARNING", "ERROR"]
    assert all(r["logger"] == "tests.unit.logs" for r in records)
    assert "RuntimeError: boom" in str(records[2]["exception"])
    assert "exception" not in records[0]


def test_time_is_utc_iso(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = logger
    log.info("now")
    (record,) = lines(stream)
    stamp = datetime.fromisoformat(str(record["time"]))
    assert stamp.utcoffset() == timedelta(0)


def test_message_arguments_are_formatted(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = logger
    log.info("ended %d runs of %s", 3, "t1")
    assert lines(stream)[0]["message"] == "ended 3 runs of t1"


def test_audit_keys_are_lifted_to_the_top_level(
    logger: tuple[logging.Logger, io.StringIO],
) -> None:
    log, stream = logger
    log.warning(
        "role may not call this method",
        extra={"audit": {"tag": "SECURITY", "method": "/runsvc.v1.RunService/ClaimRun"}},
    )
    (record,) = lines(stream)
    assert record["tag"] == "SECURITY"
    assert record["method"] == "/runsvc.v1.RunService/ClaimRun"
    assert "audit" not in record


def test_extra_fields_are_kept_and_standard_ones_are_not(
    logger: tuple[logging.Logger, io.StringIO],
) -> None:
    log, stream = logger
    log.info("serving", extra={"port": 50051, "ended": {"HEARTBEAT_TIMEOUT": 2}, "_hidden": 1})
    (record,) = lines(stream)
    assert record["port"] == 50051
    assert record["ended"] == {"HEARTBEAT_TIMEOUT": 2}
    assert "_hidden" not in record
    for standard in ("args", "msg", "levelno", "pathname", "lineno", "thread", "created"):
        assert standard not in record


def test_values_json_cannot_encode_become_strings(
    logger: tuple[logging.Logger, io.StringIO],
) -> None:
    log, stream = logger
    when = datetime(2024, 5, 1, 12, 0, 0)
    log.info("at", extra={"when": when})
    assert lines(stream)[0]["when"] == str(when)


def test_configure_sends_json_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        logs.configure("WARNING")
        assert root.level == logging.WARNING
        logging.getLogger("tests.unit.configure").info("hidden")
        logging.getLogger("tests.unit.configure").warning("shown", extra={"audit": {"tag": "T"}})
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    err = capsys.readouterr().err
    records = [json.loads(line) for line in err.splitlines()]
    assert [(r["message"], r["tag"]) for r in records] == [("shown", "T")]
