"""The Kubernetes manifests of deploy/kubernetes as ``kubectl apply -k`` would send them.

Rendered offline in Python: the kustomization's ``resources`` (files in the folder) and its
``images`` are the only features it uses, and any other key is refused here, so the render
cannot silently drift from kustomize's.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE_DIR = ROOT / "deploy" / "kubernetes"
README = KUSTOMIZE_DIR / "README.md"

Manifest = dict[str, Any]

_SUPPORTED = {"apiVersion", "kind", "resources", "images"}
_POD_TEMPLATE_KINDS = {"Deployment", "Job"}


def kustomization(directory: Path = KUSTOMIZE_DIR) -> dict[str, Any]:
    loaded = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(loaded) - _SUPPORTED
    if unknown:
        raise ValueError(f"kustomization keys this renderer does not know: {sorted(unknown)}")
    return loaded


def render(directory: Path = KUSTOMIZE_DIR) -> list[Manifest]:
    """Every object, in the order of ``resources``, with the ``images`` replaced."""
    spec = kustomization(directory)
    objects: list[Manifest] = []
    seen: set[tuple[str, str]] = set()
    for name in spec["resources"]:
        path = directory / name
        if not path.is_file():
            raise ValueError(f"resource {name} is not a file in {directory}")
        for document in yaml.safe_load_all(path.read_text()):
            if not document:
                continue
            key = (document["kind"], document["metadata"]["name"])
            if key in seen:
                raise ValueError(f"{key} is defined twice")
            seen.add(key)
            objects.append(document)
    for image in spec.get("images", []):
        for container in containers(objects):
            if image_name(container["image"]) == image["name"]:
                container["image"] = _replaced(image)
    return objects


def image_name(reference: str) -> str:
    """``registry:5000/runsvc:1.0@sha256:…`` → ``registry:5000/runsvc``."""
    name = reference.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def _replaced(image: dict[str, str]) -> str:
    name = image.get("newName", image["name"])
    if "digest" in image:
        return f"{name}@{image['digest']}"
    return f"{name}:{image['newTag']}" if "newTag" in image else name


def pod_specs(objects: list[Manifest]) -> Iterator[tuple[Manifest, Manifest]]:
    """(owner, pod spec) for every object with a pod template."""
    for obj in objects:
        if obj["kind"] in _POD_TEMPLATE_KINDS:
            yield obj, obj["spec"]["template"]["spec"]


def containers(objects: list[Manifest]) -> Iterator[Manifest]:
    for _, pod in pod_specs(objects):
        yield from pod.get("initContainers", [])
        yield from pod["containers"]


def one(objects: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether a matchLabels-style selector matches ``labels``."""
    return all(labels.get(key) == value for key, value in selector.items())


def config_maps(objects: list[Manifest]) -> dict[str, dict[str, str]]:
    return {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}


def container_env(
    container: Manifest,
    pod: Manifest,
    objects: list[Manifest],
    *,
    secrets: Mapping[tuple[str, str], str],
    files_root: Path,
    image_paths: Mapping[str, Path],
) -> dict[str, str]:
    """The container's environment as the kubelet sets it, on this machine.

    Secret values come from ``secrets`` (by Secret name and key); the Secret volumes the
    container mounts are written under ``files_root``, and every value naming a path under a
    mount (or under a folder of the image, ``image_paths``) is rewritten to where it is here.
    """
    maps = config_maps(objects)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
            continue
        ref = entry["valueFrom"]
        if "secretKeyRef" in ref:
            env[entry["name"]] = secrets[(ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"])]
        else:
            cm_ref = ref["configMapKeyRef"]
            env[entry["name"]] = maps[cm_ref["name"]][cm_ref["key"]]
    places = {folder: Path(local) for folder, local in image_paths.items()}
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        local = files_root / mount["mountPath"].lstrip("/")
        if "secret" in volume:
            # As the kubelet writes them: each item with the volume's mode; with subPath,
            # the one item as a regular file at the mount path itself.
            mode = volume["secret"].get("defaultMode", 0o644)
            items = {item["path"]: item for item in volume["secret"]["items"]}
            if "subPath" in mount:
                files = {local: items[mount["subPath"]]}
            else:
                files = {local / path: item for path, item in items.items()}
            for path, item in files.items():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(secrets[(volume["secret"]["secretName"], item["key"])])
                path.chmod(item.get("mode", mode))
        else:
            local.mkdir(parents=True, exist_ok=True)
        places[mount["mountPath"]] = local
    return {name: _relocated(value, places) for name, value in env.items()}


def _relocated(value: str, places: Mapping[str, Path]) -> str:
    for folder in sorted(places, key=len, reverse=True):
        if value == folder or value.startswith(folder.rstrip("/") + "/"):
            return str(places[folder]) + value[len(folder) :]
    return value
