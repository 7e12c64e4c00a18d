"""Pure pieces of the metrics and request context: settings, code names, request ids."""

from __future__ import annotations

import grpc
import pytest

from runsvc import logs, settings
from runsvc.api.edge import request_id_and_token
from runsvc.metrics.grpc_server import go_code


def test_metrics_address_default_off_and_invalid() -> None:
    assert settings.load({}).metrics_address == "127.0.0.1:9464"
    assert settings.load({"RUNSVC_METRICS_ADDRESS": "0.0.0.0:9100"}).metrics_address == (
        "0.0.0.0:9100"
    )
    assert settings.load({"RUNSVC_METRICS_ADDRESS": "off"}).metrics_address is None
    assert settings.load({"RUNSVC_METRICS_ADDRESS": ""}).metrics_address is None
    with pytest.raises(settings.SettingsError, match="RUNSVC_METRICS_ADDRESS"):
        settings.load({"RUNSVC_METRICS_ADDRESS": "9464"})


def test_tenant_series_is_capped() -> None:
    assert settings.load({}).metrics_tenant_series == 0
    assert settings.load({"RUNSVC_METRICS_TENANT_SERIES": "50"}).metrics_tenant_series == 50
    for bad in ("-1", "1001", "many"):
        with pytest.raises(settings.SettingsError, match="RUNSVC_METRICS_TENANT_SERIES"):
            settings.load({"RUNSVC_METRICS_TENANT_SERIES": bad})


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (None, "OK"),
        (grpc.StatusCode.OK, "OK"),
        (grpc.StatusCode.CANCELLED, "Canceled"),
        (grpc.StatusCode.INVALID_ARGUMENT, "InvalidArgument"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "DeadlineExceeded"),
        (grpc.StatusCode.UNAUTHENTICATED, "Unauthenticated"),
        (grpc.StatusCode.DATA_LOSS, "DataLoss"),
    ],
)
def test_codes_are_spelled_as_go_spells_them(code: grpc.StatusCode | None, name: str) -> None:
    assert go_code(code) == name


def test_every_code_has_a_camel_case_name() -> None:
    names = {go_code(code) for code in grpc.StatusCode}
    assert len(names) == len(grpc.StatusCode)
    assert all(name[0].isupper() and "_" not in name for name in names)


def request_id(metadata: list[tuple[str, str]] | None) -> str:
    """The id the call's log lines carry."""
    with logs.bound(request_id=request_id_and_token(metadata)[0]):
        first = logs.call_fields()["request_id"]
        assert logs.call_fields()["request_id"] == first  # made once, kept for the call
        return first


def test_request_id_is_the_callers_when_sane() -> None:
    assert request_id([("x-request-id", "abc-123")]) == "abc-123"
    for bad in ("", "has space", "x" * 129, 'quote"', "new\nline"):
        generated = request_id([("x-request-id", bad)])
        assert generated != bad and len(generated) == 32
    assert request_id(None) != request_id(None)
    assert "request_id" not in logs.call_fields()  # the binding ended with the call


def test_the_bearer_token_is_read_beside_the_request_id() -> None:
    metadata = [("authorization", "Bearer abc.def"), ("x-request-id", "r1")]
    assert request_id_and_token(metadata) == ("r1", "abc.def")
    assert request_id_and_token([("authorization", "Basic xyz")])[1] is None
