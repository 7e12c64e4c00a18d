"""Offline schema validation of deploy/kubernetes.

Built-in kinds go through kubernetes-validate's strict schemas (an unknown field fails), for
the oldest Kubernetes the manifests support and the newest the pinned package ships; both are
files inside the package, read with the network refused. kubernetes-validate has no schemas
for custom resources: the ServiceMonitor and the PrometheusRule are checked against JSON
schemas of our own (schemas/), the subset of the Prometheus Operator's fields used here.
"""

from __future__ import annotations

import copy
import json
import socket
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from kubernetes_validate.utils import all_versions
from referencing import Registry, Resource

from tests.deploy.k8s_manifests import Manifest, one, render

# 1.30: the preStop sleep action is on by default from this release (README beside the files).
KUBERNETES_VERSIONS = ("1.30", "1.37")
SCHEMAS = Path(__file__).resolve().parent / "schemas"
CUSTOM_SCHEMAS = {"ServiceMonitor": "servicemonitor.json", "PrometheusRule": "prometheusrule.json"}
BUILT_IN_KINDS = {
    "ConfigMap",
    "Deployment",
    "PodDisruptionBudget",
    "Service",
    "Job",
    "NetworkPolicy",
}


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("schema validation tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def built_in(objects: list[Manifest]) -> list[Manifest]:
    return [o for o in objects if o["kind"] not in CUSTOM_SCHEMAS]


def custom_validator(kind: str) -> jsonschema.protocols.Validator:
    loaded = [json.loads(path.read_text()) for path in sorted(SCHEMAS.glob("*.json"))]
    registry: Registry[Any] = Registry().with_resources(
        (schema["$id"], Resource.from_contents(schema)) for schema in loaded
    )
    schema = json.loads((SCHEMAS / CUSTOM_SCHEMAS[kind]).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=registry)


def test_the_pinned_kubernetes_versions_are_shipped() -> None:
    # validate() quietly falls back to an older schema for a version it does not ship.
    shipped = {".".join(version.split(".")[:2]) for version in all_versions()}
    assert set(KUBERNETES_VERSIONS) <= shipped


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_built_in_kinds_validate_strictly(version: str) -> None:
    objects = built_in(render())
    for obj in objects:
        # Raises for an invalid object, and for a kind or apiVersion it has no schema for.
        validated = kubernetes_validate.validate(obj, version, strict=True)
        assert validated == version, obj["metadata"]["name"]
    assert {o["kind"] for o in objects} == BUILT_IN_KINDS


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "template", "spec", "containers", 0, "imagePulPolicy"), "Always"),
        (("spec", "replicas"), "3"),
        (("spec", "template", "spec", "containers", 0, "readinessProbe", "grpc", "port"), "grpc"),
    ],
    ids=["misspelt field", "wrong type", "named port in a grpc probe"],
)
def test_strict_validation_refuses_a_broken_deployment(path: tuple[Any, ...], value: Any) -> None:
    deployment = copy.deepcopy(one(render(), "Deployment"))
    target = deployment
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("kind", sorted(CUSTOM_SCHEMAS))
def test_custom_resources_match_our_schemas(kind: str) -> None:
    custom_validator(kind).validate(one(render(), kind))


@pytest.mark.parametrize(
    ("kind", "change"),
    [
        ("ServiceMonitor", lambda o: o["spec"]["endpoints"][0].update(intervall="15s")),
        ("ServiceMonitor", lambda o: o["spec"]["endpoints"][0].update(interval="15 seconds")),
        ("ServiceMonitor", lambda o: o["spec"].update(selector={})),
        ("PrometheusRule", lambda o: o["spec"]["groups"][0]["rules"][0].update(alert="Both")),
        ("PrometheusRule", lambda o: o["spec"]["groups"][0]["rules"][-1].pop("expr")),
        ("PrometheusRule", lambda o: o["spec"]["groups"][0].update(rules=[])),
    ],
    ids=[
        "unknown endpoint field",
        "bad duration",
        "empty selector",
        "record and alert",
        "no expr",
        "no rules",
    ],
)
def test_our_schemas_refuse_a_broken_custom_resource(kind: str, change: Any) -> None:
    obj = copy.deepcopy(one(render(), kind))
    change(obj)
    with pytest.raises(jsonschema.ValidationError):
        custom_validator(kind).validate(obj)
