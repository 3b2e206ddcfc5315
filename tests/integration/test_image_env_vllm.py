"""The vLLM image's Python environments: vLLM's pins kept, Ray 2.60 compatible with them.

kuberay/Dockerfile.vllm installs nothing into vLLM's environment: Ray and this project get a
virtual environment of their own on TGI's Python 3.11 (Ray requires one Python on every node of
the cluster; vLLM's image runs 3.12), and the build itself compares vLLM's `pip freeze` before
and after and runs `pip check` (docs/kubernetes.md, "vLLM tiers"). What CI checks here, from
package metadata only (PyPI serves each wheel's METADATA apart from it: no wheel is fetched):

- the vLLM release the image pins resolves on the image's Python 3.12 for linux x86_64 (its own
  requirements less its exact pins of torch, its kernels and NVIDIA's libraries, which share
  nothing with Ray or this project and not all of which PyPI serves for every platform), and
  adding `ray[serve]` at the project's pin to that resolution moves none of its packages: Ray
  fits vLLM's requirements as they are.
- the release is the one the local CPU build (`make install-vllm`) and the image agree on.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from serve_app.kuberay import RAY_VERSION
from tests.unit.kuberay.test_render import ROOT

DOCKERFILE = ROOT / "kuberay" / "Dockerfile.vllm"
# The image's interpreter and platform: vLLM's wheels are cp38-abi3 manylinux_2_28.
TARGET = ["--python-version", "3.12", "--only-binary=:all:", "--implementation", "cp",
          *(f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                                         "manylinux2014_x86_64", "manylinux_2_31_x86_64",
                                         "manylinux_2_35_x86_64", "linux_x86_64"))]  # fmt: skip
MARKERS = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.0",
           "platform_machine": "x86_64", "sys_platform": "linux", "platform_system": "Linux",
           "implementation_name": "cpython"}  # fmt: skip
# The CUDA stack and GPU kernels: their own wheels, pinned to one another, nothing Ray uses.
GPU_STACK = re.compile(
    r"^(torch.*|nvidia-.*|flashinfer.*|xformers|triton|pynvvideocodec|tilelang|apache-tvm-ffi|"
    r"quack-kernels|tokenspeed-mla|humming-kernels|fastsafetensors|instanttensor|nvtx|"
    r"cupy.*|numba|depyf|compressed-tensors)$"
)


def vllm_version() -> str:
    (image,) = re.findall(r"^ARG VLLM_IMAGE=\S+:v(\S+)$", DOCKERFILE.read_text(), re.M)
    return image


def resolve(tmp: Path, name: str, *requirements: str, deps: bool = True) -> dict[str, Any]:
    """pip's dry-run report for `requirements` on the image's Python and platform."""
    report = tmp / f"{name}.json"
    env = {**os.environ, "PIP_CONSTRAINT": ""}  # the target's pins, not this machine's caps
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
         "--target", str(tmp / "target"), "--report", str(report), *TARGET,
         *([] if deps else ["--no-deps"]), *requirements],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(report.read_text())


def versions(report: dict[str, Any]) -> dict[str, str]:
    return {canonicalize_name(p["metadata"]["name"]): p["metadata"]["version"]
            for p in report["install"]}  # fmt: skip


@pytest.fixture(scope="module")
def vllm_requirements(tmp_path_factory: pytest.TempPathFactory) -> list[Requirement]:
    """vLLM's own requirements for the image's platform, short of the CUDA stack."""
    report = resolve(tmp_path_factory.mktemp("vllm"), "vllm", f"vllm=={vllm_version()}",
                     deps=False)  # fmt: skip
    (package,) = report["install"]
    assert package["metadata"]["version"] == vllm_version()
    requirements = [Requirement(r) for r in package["metadata"]["requires_dist"]]
    kept = [r for r in requirements
            if (r.marker is None or r.marker.evaluate({**MARKERS, "extra": ""}))
            and not GPU_STACK.match(canonicalize_name(r.name))]  # fmt: skip
    assert len(kept) > 30, kept  # vLLM's API server, tokenizers, structured output ...
    return kept


def test_ray_at_the_projects_pin_moves_none_of_vllms_packages(
    vllm_requirements: list[Requirement], tmp_path: Path
) -> None:
    pins = [str(r) for r in vllm_requirements]
    alone = versions(resolve(tmp_path, "alone", *pins))
    with_ray = versions(resolve(tmp_path, "with-ray", *pins, f"ray[serve]=={RAY_VERSION}"))
    assert with_ray["ray"] == RAY_VERSION
    moved = {n: (v, with_ray.get(n)) for n, v in alone.items() if with_ray.get(n) != v}
    assert not moved, f"ray[serve]=={RAY_VERSION} would change vLLM's packages: {moved}"
    # What Ray and vLLM both use is one version: e.g. the API server's stack.
    for shared in ("fastapi", "starlette", "pydantic", "aiohttp", "protobuf"):
        assert shared in alone and alone[shared] == with_ray[shared]


def test_vllm_requires_a_python_the_image_has(tmp_path: Path) -> None:
    report = resolve(tmp_path, "meta", f"vllm=={vllm_version()}", deps=False)
    requires_python = report["install"][0]["metadata"]["requires_python"]
    assert "3.12" in SpecifierSet(requires_python)
