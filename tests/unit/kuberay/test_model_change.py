"""A tier's model is a Serve-config change only: rendering `configs/src/gpu.yaml` with a tier's
model, revision or engine flags changed leaves `rayClusterConfig` byte-identical (KubeRay then
updates `serveConfigV2` on the running cluster), while a change of a pod's shape changes it
(KubeRay builds a new cluster)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from serve_app.kuberay import OVERLAYS, render_file

from .test_render import ROOT

SOURCE = ROOT / "configs" / "src" / "gpu.yaml"
Edit = Callable[[dict[str, Any]], None]


def tier(document: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [t for t in document["applications"][0]["args"]["tiers"] if t["name"] == name]
    return found


def engine(name: str, **change: Any) -> Edit:
    return lambda document: tier(document, name)["engine"].update(change)


def kube_tier(name: str, **change: Any) -> Edit:
    def edit(document: dict[str, Any]) -> None:
        tiers = document["applications"][0]["args"]["kubernetes"].setdefault("tiers", [])
        found = [t for t in tiers if t["tier"] == name]
        if not found:
            tiers.append({"tier": name})
            found = [tiers[-1]]
        found[0].update(change)

    return edit


def gpus(name: str, count: int) -> Edit:
    return lambda document: tier(document, name).update(gpus_per_replica=count)


def rendered(tmp: Path, edit: Edit | None = None) -> tuple[str, str, str]:
    """(rayClusterConfig as YAML text, serveConfigV2, everything else) of the gpu overlay's
    manifests, as `python -m serve_app.kuberay render` writes them."""
    document = yaml.safe_load(SOURCE.read_text())
    if edit is not None:
        document = copy.deepcopy(document)
        edit(document)
    path = tmp / ("edited.yaml" if edit else "gpu.yaml")
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    text = render_file(path, "gpu").split("\n", 1)[1]  # less the header line naming the file
    docs = list(yaml.safe_load_all(text))
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    cluster = yaml.safe_dump(service["spec"]["rayClusterConfig"], sort_keys=False, width=100)
    serve_config = service["spec"].pop("serveConfigV2")
    service["spec"].pop("rayClusterConfig")
    return cluster, serve_config, yaml.safe_dump_all(docs, sort_keys=False)


SERVE_LEVEL = {
    "model": engine("small", model_id="Qwen/Qwen2.5-7B-Instruct"),
    "revision": engine("small", revision="0e9e39f249a16976918f6564b8830bc894c89659"),
    "model and revision of the 4-GPU tier": engine(
        "large", model_id="Qwen/Qwen2.5-72B-Instruct", revision="main"
    ),
    "the vLLM tier's model": engine("vllm-small", model_id="Qwen/Qwen2.5-7B-Instruct"),
    "token limits": engine("small", max_input_tokens=4096, max_total_tokens=6144),
    "extra args": engine("small", extra_args=["--max-batch-prefill-tokens", "4096"]),
    "dtype and quantization": engine("small", dtype="float16", quantize="fp8"),
}


@pytest.mark.parametrize("change", sorted(SERVE_LEVEL))
def test_a_model_or_engine_change_leaves_the_ray_cluster_byte_identical(
    change: str, tmp_path: Path
) -> None:
    cluster, serve_config, rest = rendered(tmp_path)
    changed_cluster, changed_serve_config, changed_rest = rendered(tmp_path, SERVE_LEVEL[change])
    assert changed_cluster == cluster  # KubeRay keeps the cluster: no second set of GPUs
    assert changed_rest == rest  # nor a Job, budget or policy of its own
    assert changed_serve_config != serve_config  # the change is there, for Serve to apply


POD_SHAPE = {
    "GPUs per replica": gpus("small", 2),
    "a tier pod's memory": kube_tier("large", memory="384Gi"),
    "a tier pod's accelerator": kube_tier("small", accelerator="NVIDIA-H100-80GB-HBM3"),
    "a tier pod's CPUs": kube_tier("small", cpu="12"),
}


@pytest.mark.parametrize("change", sorted(POD_SHAPE))
def test_a_pod_shape_change_changes_the_ray_cluster(change: str, tmp_path: Path) -> None:
    cluster, _, _ = rendered(tmp_path)
    changed_cluster, _, _ = rendered(tmp_path, POD_SHAPE[change])
    assert changed_cluster != cluster


def test_the_committed_cluster_names_no_model() -> None:
    """The committed gpu overlay: no tier's model appears outside `serveConfigV2`."""
    text = (ROOT / "kuberay" / "overlays" / "gpu" / "rayservice.yaml").read_text()
    docs = list(yaml.safe_load_all(text))
    for doc in docs:
        if doc["kind"] == "RayService":
            doc["spec"].pop("serveConfigV2")
    elsewhere = yaml.safe_dump_all(docs)
    source = yaml.safe_load(SOURCE.read_text())["applications"][0]["args"]["tiers"]
    for found in source:
        assert found["engine"]["model_id"] not in elsewhere
    assert OVERLAYS["gpu"].model_cache_claim  # the overlay with the cache, where it mattered
