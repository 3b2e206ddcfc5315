"""The KubeRay operator's deploy path, replayed on this machine for the `local` overlay.

As the operator does: a head with the head group's `rayStartParams`, a worker per worker group
with the group's `rayStartParams`, every Ray process with the manifest's Ray environment (token
authentication on, the token read from the file the Secret is mounted as), then the RayService's
`serveConfigV2` sent as JSON with `PUT /api/serve/applications/` to the head's dashboard with the
token, and `GET` polled until RUNNING. Deviations for this sandbox: every address is loopback (not
0.0.0.0), the ports are free ones, and the Secrets' mounts are temp files.
"""

from __future__ import annotations

import secrets
import shlex
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from openai import OpenAI

from devstack import local_ray, localstack
from devstack.hosts import free_port
from serve_app.kuberay import API_KEYS, RAY_TOKEN
from serve_app.serve_env import HAPROXY_BINARY, IMAGE_SCRIPTS, haproxy_guard
from tests.helpers import all_deployments
from tests.unit.kuberay.test_render import rayservice

API_KEY = "sk-replay-0123456789abcdef"
NEW_KEY = "sk-replay-new-0123456789abcdef"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
KEY_CHANGE_WITHIN_S = 60


def start_params(params: dict[str, str]) -> list[str]:
    """`rayStartParams` as the operator turns them into `ray start` flags (values are shell
    words, e.g. `'{"tier_small":1}'`)."""
    flags = []
    for key, value in params.items():
        if key == "dashboard-host":
            value = "127.0.0.1"
        flags += shlex.split(f"--{key}={value}")
    return flags


def manifest_ray_env(container: dict[str, Any], token_file: Path) -> dict[str, str]:
    """The Ray variables the manifest gives its containers, the token's mount made a file here."""
    env = localstack.ray_env()  # the local base: PATH to this checkout's Ray
    env.update({e["name"]: e["value"] for e in container["env"]
                if e["name"].startswith("RAY_") and "value" in e})  # fmt: skip
    # the HAProxy launcher where the image installs it, and where this checkout has it
    assert env[HAPROXY_BINARY] == haproxy_guard(IMAGE_SCRIPTS)[HAPROXY_BINARY]
    env.update(haproxy_guard())
    assert env["RAY_AUTH_TOKEN_PATH"] == RAY_TOKEN.path
    env["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    # a head and its worker groups, as on a cluster: not the local stack's one node
    env.update({key: "1" for key in localstack.SINGLE_NODE})
    return env


@dataclass
class Replayed:
    dashboard: str
    http: str
    token: str
    keys_file: Path
    head: local_ray.Head  # the sessions of every Ray process started here

    def api(self, path: str) -> dict[str, Any]:
        headers = {"authorization": f"Bearer {self.token}"}
        reply = httpx.get(f"{self.dashboard}{path}", headers=headers, timeout=10)
        assert reply.status_code == 200, reply.text
        return reply.json()

    def applications(self) -> dict[str, Any]:
        return self.api("/api/serve/applications/")["applications"]

    def router_replicas(self) -> set[str]:
        replicas = self.applications()["llm"]["deployments"]["router"]["replicas"]
        return {r["replica_id"] for r in replicas}


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replayed]:
    service = rayservice("local")
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["authOptions"]["mode"] == "token"
    secrets_dir = tmp_path_factory.mktemp("secrets")
    token = secrets.token_hex(32)
    (token_file := secrets_dir / "auth_token").write_text(token)
    (keys_file := secrets_dir / "keys").write_text(
        yaml.safe_dump([{"name": "replay", "key": API_KEY}])
    )
    head_container = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = manifest_ray_env(head_container, token_file)
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
            worker_env = manifest_ray_env(group["template"]["spec"]["containers"][0], token_file)
            for _ in range(group["replicas"]):
                worker = [f"--address=127.0.0.1:{gcs}", *start_params(group["rayStartParams"])]
                sessions.append(local_ray.ray_start(worker, worker_env))
        serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
        serve_config["http_options"] = {"host": "127.0.0.1", "port": http}
        (app,) = [a for a in serve_config["applications"] if a["name"] == "llm"]
        router = app["deployments"][0]["user_config"]["router"]  # the router's configuration
        assert router["api_keys"]["file"] == API_KEYS.path
        router["api_keys"]["file"] = str(keys_file)
        url = f"http://127.0.0.1:{dashboard}"
        reply = httpx.put(
            f"{url}/api/serve/applications/",
            json=serve_config,
            headers={"authorization": f"Bearer {token}"},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        head = local_ray.Head(gcs, dashboard, 0, 0, 0, temp_dir, sessions=tuple(sessions))
        yield Replayed(url, f"http://127.0.0.1:{http}", token, keys_file, head)
    finally:
        local_ray.stop_sessions(sessions, temp_dir)


def wait_running(replayed: Replayed) -> None:
    deadline = time.monotonic() + 300
    statuses: dict[str, str] = {}
    while time.monotonic() < deadline:
        apps = replayed.applications()
        statuses = {name: app["status"] for name, app in apps.items()}
        assert not any("FAILED" in s for s in statuses.values()), apps
        if statuses and all(s == "RUNNING" for s in statuses.values()):
            return
        time.sleep(1)
    raise AssertionError(f"not RUNNING: {statuses}")


def test_the_operators_deploy_path_serves_openai(replayed: Replayed) -> None:
    wait_running(replayed)
    client = OpenAI(base_url=f"{replayed.http}/v1", api_key=API_KEY, max_retries=0)
    for model in ("small", "large"):
        reply = client.chat.completions.create(
            model=model, messages=QUESTION, max_tokens=8, temperature=0, timeout=60
        )
        assert "Paris" in (reply.choices[0].message.content or "")


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"authorization": "Bearer not-the-token"}, 403)],
    ids=["no token", "wrong token"],
)
def test_the_dashboard_refuses_calls_without_the_token(
    replayed: Replayed, headers: dict[str, str], status: int
) -> None:
    for path in ("/api/serve/applications/", "/api/jobs/", "/api/v0/nodes"):
        reply = httpx.get(f"{replayed.dashboard}{path}", headers=headers, timeout=10)
        assert reply.status_code == status, (path, reply.text)
    submit = httpx.post(
        f"{replayed.dashboard}/api/jobs/", json={"entrypoint": "env"}, headers=headers, timeout=10
    )
    assert submit.status_code == status
    # What KubeRay's probes call stays open.
    assert httpx.get(f"{replayed.dashboard}/api/gcs_healthz", timeout=10).status_code == 200


def test_each_tier_and_the_router_run_on_their_own_worker_group(replayed: Replayed) -> None:
    wait_running(replayed)
    nodes = replayed.api("/api/v0/nodes")
    by_resource = {
        resource: node["node_id"]
        for node in nodes["data"]["result"]["result"]
        for resource in node["resources_total"]
        if resource.startswith(("tier_", "serve_app_router"))
    }
    deployments = all_deployments(replayed.applications())
    for deployment, resource in [("tier-small", "tier_small"), ("tier-large", "tier_large"),
                                 ("router", "serve_app_router")]:  # fmt: skip
        nodes_used = {r["node_id"] for r in deployments[deployment]["replicas"]}
        assert nodes_used == {by_resource[resource]}, deployment


def status_with(replayed: Replayed, key: str) -> int:
    body = {"model": "small", "messages": QUESTION, "max_tokens": 2}
    headers = {"authorization": f"Bearer {key}"}
    url = f"{replayed.http}/v1/chat/completions"
    return httpx.post(url, json=body, headers=headers, timeout=60).status_code


def seconds_until(replayed: Replayed, key: str, status: int) -> float:
    start = time.monotonic()
    while (waited := time.monotonic() - start) < KEY_CHANGE_WITHIN_S:
        if status_with(replayed, key) == status:
            return waited
        time.sleep(1)
    raise AssertionError(f"the key change did not take effect within {KEY_CHANGE_WITHIN_S}s")


def test_keys_added_and_removed_in_the_mounted_file_take_effect_without_a_restart(
    replayed: Replayed,
) -> None:
    wait_running(replayed)
    router_replicas = replayed.router_replicas()
    assert status_with(replayed, NEW_KEY) == 401
    both = [{"name": "replay", "key": API_KEY}, {"name": "new", "key": NEW_KEY}]
    replayed.keys_file.write_text(yaml.safe_dump(both))
    added_after = seconds_until(replayed, NEW_KEY, 200)
    replayed.keys_file.write_text(yaml.safe_dump(both[1:]))
    removed_after = seconds_until(replayed, API_KEY, 401)
    assert status_with(replayed, NEW_KEY) == 200
    assert replayed.router_replicas() == router_replicas  # no restart
    print(f"key added: works after {added_after:.1f}s; removed: refused after {removed_after:.1f}s")


def test_no_process_has_a_secret_in_its_environment(replayed: Replayed) -> None:
    """Ray's daemons, its workers (router and tier replicas) and the engines they started."""
    wait_running(replayed)
    processes = local_ray.owned_processes(replayed.head)
    assert len(processes) > 10
    secrets_ = [replayed.token.encode(), API_KEY.encode(), NEW_KEY.encode()]
    for pid in processes:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue  # exited meanwhile
        assert not any(secret in environ for secret in secrets_), pid
