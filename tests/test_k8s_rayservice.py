"""deploy/k8s/rayservice.yaml: what KubeRay needs, and a serve config that names code that exists."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "deploy" / "k8s" / "rayservice.yaml"


def documents() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc}


def test_rayservice_has_what_kuberay_needs():
    service = documents()["RayService"]
    assert service["apiVersion"] == "ray.io/v1" and service["metadata"]["name"]
    cluster = service["spec"]["rayClusterConfig"]
    pinned = re.search(r'"ray\[serve,data\]==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert cluster["rayVersion"] == pinned
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict) and all(isinstance(v, str) for v in head["rayStartParams"].values())
    ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {6379, 8000} <= ports                     # GCS, Serve's HTTP proxy
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        assert group["template"]["spec"]["containers"][0]["image"]


def test_serve_config_imports_the_application_builder():
    service = documents()["RayService"]
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    module_name, attribute = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module_name), attribute)   # exists, and imports without ray
    assert list(inspect.signature(builder).parameters) == ["args"]       # a Serve application builder
    assert set(app["args"]) <= {"replicas", "max_models", "evaluation_actors"} and app["route_prefix"] == "/"
    env = app["runtime_env"]["env_vars"]
    from capguard.server.settings import Settings

    known = {f"CAPGUARD_{name.upper()}" for name in Settings.model_fields}
    assert {k for k in env if k.startswith("CAPGUARD_")} <= known


def test_caption_log_lives_on_the_head_pod_claim():
    docs = documents()
    service, claim = docs["RayService"], docs["PersistentVolumeClaim"]
    env = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["runtime_env"]["env_vars"]
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    assert volumes[mounts[env["CAPGUARD_DATA_DIR"]]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
