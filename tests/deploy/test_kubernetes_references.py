"""Every reference in deploy/kubernetes resolves, and the pods' settings are runsvc's.

Secrets are not part of the kustomization: the ones the pods need are listed once, in the
table of deploy/kubernetes/README.md, which is checked against the manifests and against the
`kubectl create secret` commands beside it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from runsvc import settings as settings_module
from runsvc import tokens
from runsvc.api.auth import SERVICE
from tests.deploy.k8s_manifests import (
    KUSTOMIZE_DIR,
    README,
    ROOT,
    Manifest,
    config_maps,
    container_env,
    containers,
    kustomization,
    one,
    pod_specs,
    render,
    selects,
)
from tests.keys import ec_key, public_pem

RULES = ROOT / "deploy" / "prometheus" / "runsvc.rules.yml"

# RUNSVC_* variables runsvc reads outside settings.py, with the module that reads each.
READ_DIRECTLY: dict[str, Path] = {}

# Where the image keeps what the pods name by path: nothing (the migrations ship inside
# the installed package, runsvc.migrations).
IMAGE_PATHS: dict[str, Path] = {}

# Server.stop (runsvc/server.py) joins the reaper thread for up to the grace plus this.
REAPER_JOIN_EXTRA_SECONDS = 5


@pytest.fixture(scope="module")
def objects() -> list[Manifest]:
    return render()


def documented_secrets() -> set[tuple[str, str]]:
    """(Secret, key) rows of the README's table."""
    section = README.read_text().split("## Secrets", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z0-9-]+)` \| `([^`]+)` \|", section, re.M))


def created_secrets() -> set[tuple[str, str]]:
    """(Secret, key) pairs the README's `kubectl create secret generic` commands create."""
    text = README.read_text().replace("\\\n", " ")
    found = set()
    for line in text.splitlines():
        command = re.search(r"create secret generic ([a-z0-9-]+)(.*)", line)
        if command:
            keys = re.findall(r"--from-(?:literal|file)=([^=\s]+)=", command.group(2))
            found |= {(command.group(1), key) for key in keys}
    return found


def references(objects: list[Manifest]) -> dict[str, set[tuple[str, str | None]]]:
    """Every Secret and ConfigMap a pod names: (object, key or None for all of it)."""
    found: dict[str, set[tuple[str, str | None]]] = {"Secret": set(), "ConfigMap": set()}
    for _, pod in pod_specs(objects):
        for container in pod["containers"]:
            for entry in container.get("env", []):
                ref = entry.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    found["Secret"].add((ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]))
                if "configMapKeyRef" in ref:
                    cm = ref["configMapKeyRef"]
                    found["ConfigMap"].add((cm["name"], cm["key"]))
            for source in container.get("envFrom", []):
                assert "secretRef" not in source, "keys of a whole Secret cannot be checked"
                found["ConfigMap"].add((source["configMapRef"]["name"], None))
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                items = volume["secret"].get("items")
                assert items, "a Secret volume names its keys (items), so each can be checked"
                found["Secret"] |= {(volume["secret"]["secretName"], i["key"]) for i in items}
            if "configMap" in volume:
                found["ConfigMap"].add((volume["configMap"]["name"], None))
    return found


def container_ports(objects: list[Manifest]) -> dict[str, int]:
    (container,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return {port["name"]: port["containerPort"] for port in container["ports"]}


def server_pod(objects: list[Manifest]) -> Manifest:
    return one(objects, "Deployment")["spec"]["template"]


# Stand-ins for the Secrets' values: settings are parsed, nothing is dialled.
DUMMY_SECRETS = {
    ("runsvc-database", "url"): "postgresql+psycopg2://runsvc@db.invalid:5432/runsvc",
    ("runsvc-database-migrate", "url"): "postgresql+psycopg2://migrator@db.invalid:5432/runsvc",
    ("runsvc-tls", "tls.crt"): "-----BEGIN CERTIFICATE-----\nstand-in\n-----END CERTIFICATE-----\n",
    ("runsvc-tls", "tls.key"): "-----BEGIN PRIVATE KEY-----\nstand-in\n-----END PRIVATE KEY-----\n",
    ("runsvc-redis", "url"): "redis://redis.invalid:6379/0",
    ("runsvc-jwt", "hs256-secret"): "k" * 48,
    ("runsvc-jwt", "public-keys.pem"): public_pem(ec_key()),
}


def loaded_settings(
    objects: list[Manifest], owner_kind: str, tmp_path: Path
) -> tuple[settings_module.Settings, dict[str, str], Manifest]:
    owner = one(objects, owner_kind)
    pod = owner["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = container_env(
        container,
        pod,
        objects,
        secrets=DUMMY_SECRETS,
        files_root=tmp_path,
        image_paths=IMAGE_PATHS,
    )
    return settings_module.load(env), env, container


def test_kustomization_lists_every_manifest_of_the_folder() -> None:
    files = {path.name for path in KUSTOMIZE_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization()["resources"]) == sorted(files)


def test_no_secret_is_committed(objects: list[Manifest]) -> None:
    assert [o for o in objects if o["kind"] == "Secret"] == []
    for path in KUSTOMIZE_DIR.glob("*.yaml"):
        kinds = {doc.get("kind") for doc in yaml.safe_load_all(path.read_text()) if doc}
        assert "Secret" not in kinds, path


def test_every_secret_named_is_documented_and_created_by_the_readme(
    objects: list[Manifest],
) -> None:
    named = references(objects)["Secret"]
    assert named == documented_secrets()
    assert created_secrets() == documented_secrets()


def test_every_config_map_named_is_defined_with_its_keys(objects: list[Manifest]) -> None:
    maps = config_maps(objects)
    named = references(objects)["ConfigMap"]
    assert named, "the pods take their settings from a ConfigMap"
    for name, key in named:
        assert name in maps, f"ConfigMap {name} is not in the kustomization"
        assert key is None or key in maps[name], f"ConfigMap {name} has no key {key}"


def test_every_runsvc_variable_is_a_setting(objects: list[Manifest]) -> None:
    known = set(settings_module.variables()) | set(READ_DIRECTLY)
    maps = config_maps(objects)
    used: set[str] = set()
    for container in containers(objects):
        used |= {entry["name"] for entry in container.get("env", [])}
        for source in container.get("envFrom", []):
            used |= set(maps[source["configMapRef"]["name"]])
    runsvc_names = {name for name in used if name.startswith("RUNSVC_")}
    assert runsvc_names - known == set()
    assert not any("TESTONLY" in name for name in runsvc_names)
    for name, module in READ_DIRECTLY.items():
        assert f'os.environ.get("{name}")' in module.read_text(), (name, module)
    for data in maps.values():
        assert not [v for v in data.values() if "$(" in v], "no $(VAR) expansion"


def test_the_server_containers_settings_load(objects: list[Manifest], tmp_path: Path) -> None:
    settings, env, _ = loaded_settings(objects, "Deployment", tmp_path)
    ports = container_ports(objects)
    # Probes and Prometheus reach the pod on its own IP: both listen on every address.
    assert settings.grpc_address == f"0.0.0.0:{ports['grpc']}"
    assert settings.metrics_address == f"0.0.0.0:{ports['metrics']}"
    assert settings.database_url == DUMMY_SECRETS[("runsvc-database", "url")]
    assert settings.redis_url == DUMMY_SECRETS[("runsvc-redis", "url")]
    # The HS256 secret is a file (never in the environment), one runsvc accepts as private.
    assert settings.jwt_secret is None and "RUNSVC_JWT_SECRET" not in env
    assert settings.jwt_secret_path is not None
    assert (
        tokens.read_secret(settings.jwt_secret_path)
        == DUMMY_SECRETS[("runsvc-jwt", "hs256-secret")]
    )
    # TLS on the gRPC port, with the certificate and key the runsvc-tls Secret mounts.
    assert settings.tls_cert_file is not None and settings.tls_key_file is not None
    assert settings.tls_cert_file.read_text() == DUMMY_SECRETS[("runsvc-tls", "tls.crt")]
    assert settings.tls_key_file.read_text() == DUMMY_SECRETS[("runsvc-tls", "tls.key")]
    # Plaintext health on a port of its own, for the kubelet's probes.
    assert settings.health_address == f"0.0.0.0:{ports['health']}"
    assert settings.jwt_public_key_file is not None
    # The path names the key the Secret volume mounts.
    assert settings.jwt_public_key_file.is_relative_to(tmp_path)
    assert (
        settings.jwt_public_key_file.read_text() == DUMMY_SECRETS[("runsvc-jwt", "public-keys.pem")]
    )


def test_the_migration_job_migrates_as_a_role_of_its_own(
    objects: list[Manifest], tmp_path: Path
) -> None:
    settings, env, container = loaded_settings(objects, "Job", tmp_path)
    assert container["command"] + container["args"] == ["runsvc", "migrate"]
    assert settings.database_url == DUMMY_SECRETS[("runsvc-database-migrate", "url")]
    assert not [name for name in env if "MIGRATIONS" in name]
    (server,) = server_pod(objects)["spec"]["containers"]
    assert container["image"] == server["image"]
    # The image the Dockerfile builds, at the one version of both distributions.
    version = (ROOT / "clients" / "runsvc_client" / "VERSION").read_text().strip()
    assert container["image"] == f"registry.example.com/runsvc:{version}"

    def database_ref(c: Manifest) -> Any:
        (entry,) = [e for e in c["env"] if e["name"] == "RUNSVC_DATABASE_URL"]
        return entry["valueFrom"]["secretKeyRef"]

    # The migration role owns the schema; the server's role only reads and writes rows.
    assert database_ref(container)["name"] != database_ref(server)["name"]


def test_termination_grace_covers_the_servers_drain(
    objects: list[Manifest], tmp_path: Path
) -> None:
    settings, _, container = loaded_settings(objects, "Deployment", tmp_path)
    pod = server_pod(objects)["spec"]
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = settings.shutdown_grace_seconds
    # preStop, then the calls' drain, then the reaper's join, then 5 s for the rest.
    needed = pause + grace + (grace + REAPER_JOIN_EXTRA_SECONDS) + 5
    assert needed <= pod["terminationGracePeriodSeconds"] <= needed + 30


def test_probes_hit_the_health_port_and_the_health_services_the_server_sets(
    objects: list[Manifest],
) -> None:
    (container,) = server_pod(objects)["spec"]["containers"]
    probes = [container[name] for name in ("startupProbe", "readinessProbe", "livenessProbe")]
    for probe in probes:
        # The plaintext health port, on threads of its own: busy is not dead.
        assert probe["grpc"]["port"] == container_ports(objects)["health"]
        # Server.start sets SERVING for exactly these two names.
        assert probe["grpc"].get("service", "") in {"", SERVICE}
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE


def test_services_target_named_container_ports(objects: list[Manifest]) -> None:
    ports = container_ports(objects)
    services = [o for o in objects if o["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} == {
        "runsvc",
        "runsvc-headless",
        "runsvc-metrics",
    }
    # The services clients use carry gRPC only: the metrics are Prometheus's alone.
    for name in ("runsvc", "runsvc-headless"):
        names = [p["name"] for p in one(objects, "Service", name)["spec"]["ports"]]
        assert names == ["grpc"], (name, names)
    ports = container_ports(objects)
    for service in services:
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, (service["metadata"]["name"], port)
            assert port["name"] == port["targetPort"]
    assert one(objects, "Service", "runsvc-headless")["spec"]["clusterIP"] == "None"
    assert one(objects, "Service", "runsvc")["spec"]["type"] == "ClusterIP"


def test_services_and_the_budget_select_the_server_pods_only(objects: list[Manifest]) -> None:
    deployment = one(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    job_labels = one(objects, "Job")["spec"]["template"]["metadata"]["labels"]
    selectors = [deployment["spec"]["selector"]["matchLabels"]]
    selectors += [s["spec"]["selector"] for s in objects if s["kind"] == "Service"]
    selectors.append(one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    for constraint in deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]:
        selectors.append(constraint["labelSelector"]["matchLabels"])
    for selector in selectors:
        assert selects(selector, pod_labels), selector
        assert not selects(selector, job_labels), f"{selector} also selects the migration pod"


def test_the_budget_leaves_a_majority_serving(objects: list[Manifest]) -> None:
    replicas = one(objects, "Deployment")["spec"]["replicas"]
    assert replicas == 3
    assert one(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_service_monitor_scrapes_the_metrics_port_once_as_the_rules_job(
    objects: list[Manifest],
) -> None:
    monitor = one(objects, "ServiceMonitor")
    chosen = [
        s
        for s in objects
        if s["kind"] == "Service"
        and selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert [s["metadata"]["name"] for s in chosen] == ["runsvc-metrics"], "scraped once"
    (service,) = chosen
    (endpoint,) = monitor["spec"]["endpoints"]
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert container_ports(objects)[port["targetPort"]] == container_ports(objects)["metrics"]
    assert endpoint["path"] == "/metrics"
    assert seconds(endpoint["scrapeTimeout"]) <= seconds(endpoint["interval"])
    # The operator names the job after the Service's jobLabel label, else after the Service.
    job = service["metadata"]["labels"].get(
        monitor["spec"].get("jobLabel"), service["metadata"]["name"]
    )
    assert set(re.findall(r'job="([^"]+)"', RULES.read_text())) == {job}


def seconds(duration: str) -> int:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, f"durations here are whole seconds: {duration}"
    return int(match.group(1))


def test_the_pods_are_locked_down(objects: list[Manifest]) -> None:
    for _, pod in pod_specs(objects):
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        assert pod["automountServiceAccountToken"] is False
        # Service links would add RUNSVC_SERVICE_HOST… next to the real settings.
        assert pod["enableServiceLinks"] is False
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert set(container["resources"]) == {"requests", "limits"}
            for mount in container.get("volumeMounts", []):
                # A subPath mount never sees a Secret's update: only the HS256 secret, which
                # runsvc reads once and refuses through the kubelet's symbolic link.
                assert "subPath" not in mount or mount["name"] == "jwt-secret"


def test_the_prometheus_rule_carries_the_rules_file_unchanged(objects: list[Manifest]) -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    assert one(objects, "PrometheusRule")["spec"]["groups"] == groups


def test_network_policies_let_in_clients_and_prometheus_only(objects: list[Manifest]) -> None:
    policies = {o["metadata"]["name"]: o for o in objects if o["kind"] == "NetworkPolicy"}
    assert set(policies) == {"runsvc", "runsvc-migrate"}
    server_labels = server_pod(objects)["metadata"]["labels"]
    job_labels = one(objects, "Job")["spec"]["template"]["metadata"]["labels"]
    server, job = policies["runsvc"]["spec"], policies["runsvc-migrate"]["spec"]
    assert selects(server["podSelector"]["matchLabels"], server_labels)
    assert not selects(server["podSelector"]["matchLabels"], job_labels)
    assert selects(job["podSelector"]["matchLabels"], job_labels)
    for spec in (server, job):
        # Both directions are governed: what is not listed is refused.
        assert spec["policyTypes"] == ["Ingress", "Egress"]
    allowed = {
        rule["ports"][0]["port"]: rule["from"][0]["podSelector"]["matchLabels"]
        for rule in server["ingress"]
    }
    assert allowed == {
        "grpc": {"runsvc.io/client": "true"},
        "metrics": {"app.kubernetes.io/name": "prometheus"},
    }
    assert set(allowed) <= set(container_ports(objects))
    assert "ingress" not in job  # nothing reaches the migration Job
    out = {port["port"] for rule in server["egress"] for port in rule["ports"]}
    assert out == {5432, 6379, 53}
    assert {port["port"] for rule in job["egress"] for port in rule["ports"]} == {5432, 53}
