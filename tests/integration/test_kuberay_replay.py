"""The KubeRay operator's deploy path, replayed on this machine for the `local` overlay.

As the operator does: a head with the head group's `rayStartParams`, a worker per worker group
with the group's `rayStartParams`, then the RayService's `serveConfigV2` sent as JSON with
`PUT /api/serve/applications/` to the head's dashboard, and `GET` polled until RUNNING. Two
deviations for this sandbox: every address is loopback (not 0.0.0.0) and the ports are free ones.
"""

from __future__ import annotations

import json
import shlex
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml
from openai import OpenAI

from serve_app import local_ray, localstack
from tests.helpers import free_port
from tests.unit.test_kuberay import rayservice

API_KEY = "sk-replay-0123456789abcdef"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def start_params(params: dict[str, str]) -> list[str]:
    """`rayStartParams` as the operator turns them into `ray start` flags (values are shell
    words, e.g. `'{"tier_small":1}'`)."""
    flags = []
    for key, value in params.items():
        if key == "dashboard-host":
            value = "127.0.0.1"
        flags += shlex.split(f"--{key}={value}")
    return flags


@pytest.fixture(scope="module")
def replayed() -> Iterator[dict[str, Any]]:
    service = rayservice("local")
    cluster = service["spec"]["rayClusterConfig"]
    env = localstack.ray_env()
    # What the Secret named in the manifest provides to every pod.
    env["SERVE_APP_API_KEYS"] = json.dumps([{"name": "replay", "key": API_KEY}])
    gcs, dashboard, http = free_port(), free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    env.update(localstack.ingress_env(temp_dir))  # HAProxy's ports and files, this cluster's own
    sessions = [
        local_ray.ray_start(
            [
                "--head", f"--port={gcs}", f"--dashboard-port={dashboard}",
                f"--ray-client-server-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--temp-dir={temp_dir}", "--disable-usage-stats",
                *start_params(cluster["headGroupSpec"]["rayStartParams"]),
            ],
            env,
        )
    ]  # fmt: skip
    try:
        for group in cluster["workerGroupSpecs"]:
            for _ in range(group["replicas"]):
                worker = [f"--address=127.0.0.1:{gcs}", *start_params(group["rayStartParams"])]
                sessions.append(local_ray.ray_start(worker, env))
        serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
        serve_config["http_options"] = {"host": "127.0.0.1", "port": http}
        url = f"http://127.0.0.1:{dashboard}"
        reply = httpx.put(f"{url}/api/serve/applications/", json=serve_config, timeout=60)
        assert reply.status_code == 200, reply.text
        yield {"dashboard": url, "http": f"http://127.0.0.1:{http}", "cluster": cluster}
    finally:
        local_ray.stop_sessions(sessions, temp_dir)


def applications(dashboard: str) -> dict[str, Any]:
    return httpx.get(f"{dashboard}/api/serve/applications/", timeout=10).json()["applications"]


def test_the_operators_deploy_path_serves_openai(replayed: dict[str, Any]) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        apps = applications(replayed["dashboard"])
        statuses = {name: app["status"] for name, app in apps.items()}
        assert not any("FAILED" in s for s in statuses.values()), apps
        if statuses and all(s == "RUNNING" for s in statuses.values()):
            break
        time.sleep(1)
    else:
        raise AssertionError(f"not RUNNING: {statuses}")
    client = OpenAI(base_url=f"{replayed['http']}/v1", api_key=API_KEY, max_retries=0)
    for model in ("small", "large"):
        reply = client.chat.completions.create(
            model=model, messages=QUESTION, max_tokens=8, temperature=0, timeout=60
        )
        assert "Paris" in (reply.choices[0].message.content or "")


def test_each_tier_runs_on_its_own_worker_group(replayed: dict[str, Any]) -> None:
    nodes = httpx.get(f"{replayed['dashboard']}/api/v0/nodes", timeout=10).json()
    by_resource = {
        resource: node["node_id"]
        for node in nodes["data"]["result"]["result"]
        for resource in node["resources_total"]
        if resource.startswith("tier_")
    }
    deployments = applications(replayed["dashboard"])["llm"]["deployments"]
    for name in ("small", "large"):
        nodes_used = {r["node_id"] for r in deployments[f"tier-{name}"]["replicas"]}
        assert nodes_used == {by_resource[f"tier_{name}"]}
