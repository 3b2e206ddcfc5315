"""The local stack owns only what it started: an unrelated Ray head on the machine survives the
project's `up`, `down` and the tests' own clean-up."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from devstack import local_ray, localstack
from devstack.hosts import free_port

from .conftest import local_config


@pytest.fixture
def unrelated_head() -> Iterator[str]:
    """A Ray head a developer started by hand, as `ray start --head` does, on ports of its own."""
    dashboard = free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    args = [
        "--head", f"--port={free_port()}", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        "--num-cpus=0", f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]  # fmt: skip
    session = local_ray.ray_start(args, localstack.ray_env())
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        local_ray.stop_sessions([session], temp_dir)


def alive(dashboard: str) -> bool:
    try:
        return httpx.get(f"{dashboard}/api/version", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_up_and_down_leave_an_unrelated_head_alone(unrelated_head: str, tmp_path: Path) -> None:
    config = local_config()
    config["http_options"]["port"] = free_port()
    args = config["applications"][0]["args"]
    args["tiers"] = [args["tiers"][0] | {"overflow_tier": None}]
    args["tiers"][0]["engine"] |= {"model_id": "simulated"}
    args["router"].pop("auto_rules")
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    state = tmp_path / "head.json"

    head = localstack.up(path, state)
    try:
        assert head.dashboard != unrelated_head
        reply = httpx.get(f"http://127.0.0.1:{config['http_options']['port']}/v1/models")
        assert reply.status_code == 200
        assert alive(unrelated_head)
        # A second `up` reuses this checkout's own head, never the unrelated one.
        assert localstack.up(path, state).dashboard == head.dashboard
    finally:
        localstack.down(state)
    assert not state.exists()
    assert not local_ray.owned_processes(head)
    assert not alive(head.dashboard)
    assert alive(unrelated_head)


def test_the_tests_own_clean_up_leaves_an_unrelated_head_alone(unrelated_head: str) -> None:
    env = localstack.ray_env()
    head = localstack.start_head(local_ray.Head.private(num_cpus=1), env)
    assert alive(head.dashboard)
    localstack.stop_head(head)
    assert not local_ray.owned_processes(head)
    assert alive(unrelated_head)


def test_down_without_a_recorded_stack_stops_nothing(unrelated_head: str, tmp_path: Path) -> None:
    state = tmp_path / "none.json"
    code = f"import pathlib; from devstack import localstack; localstack.down(pathlib.Path({str(state)!r}))"
    result = subprocess.run(
        [str(localstack.BIN / "python"), "-c", code], capture_output=True, text=True, check=True
    )
    assert "nothing to stop" in result.stdout
    assert alive(unrelated_head)
