"""The KubeRay manifests: rendered from configs/, valid against KubeRay's own CRDs."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import ValidationError
from ray.serve.schema import ServeDeploySchema

from serve_app.config import AppConfig
from serve_app.kuberay import render_file
from tests.crd import validator

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = {"gpu": "configs/gpu.yaml", "local": "configs/local.yaml"}


def kustomize(path: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (client) is needed to render the overlays"
    out = subprocess.run([kubectl, "kustomize", str(ROOT / path)], capture_output=True,
                         text=True, check=True)  # fmt: skip
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def rayservice(overlay: str) -> dict[str, Any]:
    (service,) = [d for d in kustomize(f"kuberay/overlays/{overlay}") if d["kind"] == "RayService"]
    return service


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_committed_manifest_is_what_the_config_renders(overlay: str) -> None:
    committed = (ROOT / "kuberay" / "overlays" / overlay / "rayservice.yaml").read_text()
    assert committed == render_file(Path(OVERLAYS[overlay]), overlay), (
        f"kuberay/overlays/{overlay}/rayservice.yaml is stale: run "
        f"python -m serve_app.kuberay render {OVERLAYS[overlay]} --overlay {overlay}"
    )


@pytest.mark.parametrize("path", ["kuberay/overlays/gpu", "kuberay/overlays/local",
                                  "kuberay/monitoring"])  # fmt: skip
def test_kustomize_renders(path: str) -> None:
    kinds = {doc["kind"] for doc in kustomize(path)}
    assert kinds, path


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_rayservice_is_valid_against_the_crd(overlay: str) -> None:
    validator().validate(rayservice(overlay))


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_serve_config_v2_passes_serve_and_our_config(overlay: str) -> None:
    service = rayservice(overlay)
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    (app,) = serve_config["applications"]
    config = AppConfig.model_validate(app["args"])
    groups = {g["groupName"]: g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    for tier in config.tiers:
        group = groups[f"tier-{tier.name}"]
        assert (group["minReplicas"], group["maxReplicas"]) == (
            tier.replicas.min,
            tier.replicas.max,
        )
        advertised = yaml.safe_load(group["rayStartParams"]["resources"].strip("'"))
        assert advertised == {k: int(v) for k, v in tier.ray_resources.items()}
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        expected_gpus = tier.gpus_per_replica if overlay == "gpu" else None
        assert limits.get("nvidia.com/gpu") == expected_gpus


def _broken(change: str) -> dict[str, Any]:
    service = copy.deepcopy(rayservice("local"))
    cluster = service["spec"]["rayClusterConfig"]
    if change == "unknown field":
        service["spec"]["serveConfig"] = "typo for serveConfigV2"
    elif change == "rayStartParams not strings":
        cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    elif change == "worker group without template":
        del cluster["workerGroupSpecs"][0]["template"]
    elif change == "container without name":
        del cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["name"]
    elif change == "replicas as text":
        cluster["workerGroupSpecs"][0]["maxReplicas"] = "two"
    return service


@pytest.mark.parametrize("change", ["unknown field", "rayStartParams not strings",
                                    "worker group without template", "container without name",
                                    "replicas as text"])  # fmt: skip
def test_broken_manifests_are_rejected(change: str) -> None:
    with pytest.raises(ValidationError):
        validator().validate(_broken(change))
