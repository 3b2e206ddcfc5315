"""A maintained Kubernetes policy scanner (checkov) over every rendered overlay.

Checkov knows Pods, Jobs and Deployments, not KubeRay's RayService: each of the RayService's pod
templates (head and every worker group) is also scanned as the Pod KubeRay will make of it.
Checkov runs from an environment of its own (it pins its dependencies below what Ray needs),
installed once into `.cache/` by the fixture below.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.kuberay.test_render import ROOT, kustomize

CHECKOV = "checkov==3.3.30"
PATHS = [
    "kuberay/overlays/gpu",
    "kuberay/overlays/local",
    "kuberay/overlays/gpu-ha",
    "kuberay/overlays/gpu-gateway",
    "kuberay/monitoring",
]
# Checks that do not apply, each with its reason. Exceptions for one pod are annotations on it
# (`checkov.io/skip1`), rendered by serve_app/kuberay/pods.py.
SKIPPED = {
    "CKV_K8S_21": "the namespace is the installer's choice (`kubectl apply -n`, or kustomize's "
    "`namespace:`), not the manifests'",
    "CKV_K8S_43": "the image is built and pushed per installation; `kustomize edit set image` "
    "pins it, by digest, in the overlay (docs/operations.md)",
    "CKV_K8S_15": "images are pinned by digest, so IfNotPresent cannot run another image; "
    "`Always` would make every GPU node re-pull the multi-GiB TGI image on each pod start",
    "CKV_K8S_8": "KubeRay adds the liveness probes to Ray's containers (raylet and GCS health)",
    "CKV_K8S_9": "KubeRay adds the readiness probes to Ray's containers (raylet and GCS health)",
}


@pytest.fixture(scope="session")
def checkov() -> Path:
    venv = ROOT / ".cache" / CHECKOV.replace("==", "-")
    binary = venv / "bin" / "checkov"
    if not binary.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", CHECKOV],
                       check=True)  # fmt: skip
    return binary


def as_pods(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Pods KubeRay makes of each RayService's head and worker group templates."""
    pods = []
    for doc in docs:
        if doc["kind"] != "RayService":
            continue
        cluster = doc["spec"]["rayClusterConfig"]
        groups = [("head", cluster["headGroupSpec"])]
        groups += [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
        for name, group in groups:
            template = group["template"]
            metadata = {**template.get("metadata", {}), "name": f"{doc['metadata']['name']}-{name}"}
            pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
                         "spec": template["spec"]})  # fmt: skip
    return pods


@pytest.mark.parametrize("path", PATHS)
def test_the_scanner_finds_nothing(checkov: Path, path: str, tmp_path: Path) -> None:
    docs = kustomize(path)
    scanned = tmp_path / "manifests.yaml"
    scanned.write_text(yaml.safe_dump_all([*docs, *as_pods(docs)]))
    out = subprocess.run(
        [str(checkov), "-f", str(scanned), "--framework", "kubernetes", "-o", "json",
         "--skip-download", "--skip-check", ",".join(SKIPPED)],
        capture_output=True, text=True,
    )  # fmt: skip
    report = json.loads(out.stdout)
    if isinstance(report, list):  # one report per framework
        (report,) = [r for r in report if r["check_type"] == "kubernetes"]
    failed = [f"{c['check_id']} {c['check_name']}: {c['resource']}"
              for c in report.get("results", {}).get("failed_checks", [])]  # fmt: skip
    assert not failed, "\n".join(failed)
    if path != "kuberay/monitoring":  # only custom resources there: nothing checkov knows
        assert report["summary"]["passed"] > 100
