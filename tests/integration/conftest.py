from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from openai import OpenAI

from devstack import localstack
from devstack.hosts import engines_under, free_port
from devstack.local_ray import Head
from serve_app.pod_log import ENV as POD_LOG_ENV
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.integration)


class RunningEngine:
    def __init__(self, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.process = process
        self.log = log


def start_engine(log: Path, *flags: str) -> RunningEngine:
    """The local engine as the supervisor starts it: a real process on a real port."""
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "serve_app.local_engine", "--port", str(port), *flags],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"engine exited with {process.returncode}:\n{log.read_text()}")
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, 60, "the local engine to be ready")
    return RunningEngine(url, process, log)


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningEngine]:
    log = tmp_path_factory.mktemp("engine") / "engine.log"
    running = start_engine(
        log,
        "--max-batch-size", "2",
        "--max-concurrent-requests", "8",
        "--max-input-tokens", "512",
        "--max-total-tokens", "1024",
    )  # fmt: skip
    yield running
    running.process.terminate()
    running.process.wait(timeout=60)


@cache
def _local_config() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())


def local_config() -> dict[str, Any]:
    """A fresh copy of the shipped configs/local.yaml, as a Serve config dict."""
    return copy.deepcopy(_local_config())


@dataclass
class Stack:
    """A real Ray head on this machine, and what was deployed to it."""

    head: Head
    env: dict[str, str]
    http_port: int
    workdir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def openai(self) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    def engines(self) -> dict[int, list[str]]:
        return engines_under(self.env["TMPDIR"])

    def deploy(self, config: dict[str, Any], *, wait: bool = True) -> None:
        """`serve deploy` a config (its HTTP port set to this stack's), as users do."""
        config = copy.deepcopy(config)
        config.setdefault("http_options", {})["port"] = self.http_port
        path = self.workdir / "serve.yaml"
        path.write_text(yaml.safe_dump(config))
        localstack.deploy(path, self.head, self.env)
        if wait:
            localstack.wait_running(self.head, timeout_s=300)


@pytest.fixture(scope="module")
def ray_head(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A Ray head per test module, on ports of its own; stopped however the module ends. A
    module with `POD_LOG = True` gets a pod log (`serve_app.pod_log`) at `workdir/pod.log`, as
    a KubeRay pod has its first process's stdout."""
    workdir = tmp_path_factory.mktemp("stack")
    env = localstack.ray_env()
    env["TMPDIR"] = str(tmp_path_factory.mktemp("replicas"))  # marks this stack's engines
    if getattr(request.module, "POD_LOG", False):
        env[POD_LOG_ENV] = str(workdir / "pod.log")
    head = localstack.start_head(Head.private(), env)
    try:
        yield Stack(head, env, free_port(), workdir)
    finally:
        localstack.stop_head(head)
