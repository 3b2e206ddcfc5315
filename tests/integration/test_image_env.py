"""The image leaves TGI's Python environment as TGI locked it.

TGI's image installs `server/uv.lock` into /usr/src/.venv (../shared/refs/tgi). This rebuilds the
part of it that Ray and this project would touch (OpenTelemetry, gRPC, aiohttp, requests,
packaging, typing_extensions, huggingface_hub and their locked dependencies: no torch or CUDA),
runs the image's own install step (kuberay/install-serve-app.sh, as kuberay/Dockerfile does, with
that environment's interpreter) and checks the environment is unchanged and `pip check`-clean.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from serve_app.kuberay import RAY_VERSION
from tests.unit.kuberay.test_render import ROOT

LOCK = ROOT.parent / "shared" / "refs" / "tgi" / "server-uv.lock"
# What Ray and this project also depend on, with other versions than TGI's lock.
TOUCHED = ("opentelemetry-", "aiohttp", "requests", "packaging", "typing-extensions", "grpcio",
           "protobuf", "huggingface-hub", "grpc-interceptor")  # fmt: skip


def locked_closure(lock: dict, roots: tuple[str, ...]) -> dict[str, str]:
    """name -> version for the lock's packages matching `roots` and all they depend on."""
    packages = {p["name"]: p for p in lock["package"]}
    todo = [name for name in packages if name.startswith(roots)]
    found: dict[str, str] = {}
    while todo:
        name = todo.pop()
        if name not in found:
            found[name] = packages[name]["version"]
            todo += [d["name"] for d in packages[name].get("dependencies", [])]
    return found


def pip(python: Path, *args: str) -> str:
    out = subprocess.run([str(python), "-m", "pip", *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def tgi_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The locked part of /usr/src/.venv, on this machine's Python 3.11 like TGI's."""
    lock = tomllib.loads(LOCK.read_text())
    closure = locked_closure(lock, TOUCHED)
    assert not any(n.startswith(("torch", "nvidia", "triton")) for n in closure), closure
    venv = tmp_path_factory.mktemp("tgi") / ".venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip(python, "install", "--quiet", "--no-deps", *(f"{n}=={v}" for n, v in closure.items()))
    return python


def test_the_rebuilt_tgi_environment_is_what_the_lock_says(tgi_env: Path) -> None:
    lock = tomllib.loads(LOCK.read_text())
    frozen = dict(line.split("==") for line in pip(tgi_env, "freeze", "--all").split())
    for name, version in locked_closure(lock, TOUCHED).items():
        assert frozen[_canonical(name, frozen)] == version
    pip(tgi_env, "check")


def test_the_images_install_leaves_tgi_unchanged(tgi_env: Path, tmp_path: Path) -> None:
    before = pip(tgi_env, "freeze", "--all")
    venv = tmp_path / "serve-app"
    out = subprocess.run(
        ["sh", str(ROOT / "kuberay" / "install-serve-app.sh"), str(tgi_env), str(venv), str(ROOT)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"ray {RAY_VERSION}" in out.stdout
    assert pip(tgi_env, "freeze", "--all") == before
    pip(tgi_env, "check")
    # Ray's own environment: what Ray needs, in versions TGI's lock would not allow.
    ours = dict(line.split("==") for line in pip(venv / "bin" / "python", "freeze").split()
                if "==" in line)  # fmt: skip
    assert ours["ray"] == RAY_VERSION
    assert ours["opentelemetry-sdk"] != frozen_version(before, "opentelemetry-sdk")


def test_ray_is_pinned_once_and_rendered_from_the_pin() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = [d for d in pyproject["project"]["dependencies"] if d.startswith("ray")]
    assert pins == [f"ray[serve]=={RAY_VERSION}"]
    dockerfile = (ROOT / "kuberay" / "Dockerfile").read_text()
    assert not re.search(r"ray\S*==", dockerfile)  # the image installs the project's pin
    (base,) = re.findall(r"^ARG TGI_IMAGE=(\S+)$", dockerfile, re.M)
    assert "FROM ${TGI_IMAGE}" in dockerfile and base.endswith(":3.3.7")


def frozen_version(freeze: str, name: str) -> str:
    return dict(line.split("==") for line in freeze.split())[name]


def _canonical(name: str, frozen: dict[str, str]) -> str:
    wanted = re.sub(r"[-_.]+", "-", name).lower()
    return next(k for k in frozen if re.sub(r"[-_.]+", "-", k).lower() == wanted)
