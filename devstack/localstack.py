"""Run the whole stack on this machine: a Ray head, `serve deploy`, wait until it answers.

    python -m devstack.localstack up [--config configs/local.yaml]
    python -m devstack.localstack down

The tests start their stack through the same functions, so the path users take is the tested one.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import yaml

from serve_app.serve_config import render
from serve_app.serve_env import SERVE_TUNING, ingress_guards

from . import local_ray
from .hosts import free_port, port_free
from .local_ray import BIN, Head, owned_processes, stop_head

__all__ = ["BIN", "Head", "deploy", "ray_env", "shutdown", "start_head", "stop_head"]

# What `up` started, so that `down` stops exactly that (and never another Ray on this machine).
STATE = Path(".localstack") / "head.json"


# HAProxy's own listeners (Prometheus exporter, stats page) and Serve's fallback proxy (which
# answers while no router replica is up) default to fixed ports, and HAProxy's files to
# /tmp/haproxy-serve: a head of this checkout's own gets free ports and keeps the files in its
# temp dir, so that two heads on one machine never collide.
INGRESS_PORTS = {
    "RAY_SERVE_HAPROXY_METRICS_PORT": 9101,
    "RAY_SERVE_HAPROXY_STATS_PORT": 8404,
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": 8500,
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": 9500,
}


def ingress_env(temp_dir: str, *, prefer_defaults: bool = False) -> dict[str, str]:
    """Where the HAProxy of a Ray cluster with this temp dir listens and keeps its files."""
    base = Path(temp_dir) / "haproxy"

    ports = {
        name: str(free_port(default if prefer_defaults else None))
        for name, default in INGRESS_PORTS.items()
    }
    return {
        **ports,
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(base / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(base / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(base),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(base / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(base / "metrics.sock"),
    }


def start_head(head: Head, env: Mapping[str, str], *, prefer_defaults: bool = False) -> Head:
    """Start `head` with `env` plus its own HAProxy ports and files (`ingress_env`)."""
    ingress = ingress_env(head.temp_dir, prefer_defaults=prefer_defaults)
    return local_ray.start_head(head, {**env, **ingress})


# One machine, one node: Ray takes loopback for the node's address (Ray otherwise replaces a
# `--node-ip-address` of 127.0.0.1 with the machine's network address), so that what binds to
# it (Ray's client server, engines on the direct data path) is not reachable from the network.
SINGLE_NODE = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def ray_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment every Ray process and CLI call of a local stack gets.

    Token auth stays off locally (a first `ray.init` would otherwise switch it on for every later
    start), and the raylet reaps the children of killed workers, so that an engine whose replica
    was killed cannot outlive it.
    """
    env = dict(os.environ if base is None else base)
    env["RAY_AUTH_MODE"] = "disabled"
    env["RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper"] = "true"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.update(SINGLE_NODE)
    env.update(SERVE_TUNING)
    env.update(ingress_guards(env))
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(args: list[str], env: Mapping[str, str]) -> None:
    subprocess.run(args, env=dict(env), check=True, stdout=subprocess.DEVNULL)


def deploy(config: Path, head: Head, env: Mapping[str, str]) -> None:
    """`serve deploy` of `config`; a source config (`configs/src/`) is rendered first, into a
    temporary file, as one application per tier (`serve_app.serve_config`)."""
    document = yaml.safe_load(config.read_text())
    rendered = render(document)
    if rendered == document:
        _run([str(BIN / "serve"), "deploy", str(config), "-a", head.dashboard], env)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "serve.yaml"
        path.write_text(yaml.safe_dump(rendered, sort_keys=False))
        _run([str(BIN / "serve"), "deploy", str(path), "-a", head.dashboard], env)


def shutdown(head: Head, env: Mapping[str, str]) -> None:
    _run([str(BIN / "serve"), "shutdown", "-y", "-a", head.dashboard], env)


def wait_running(head: Head, timeout_s: float = 600) -> None:
    """Poll the dashboard's Serve API until every application is RUNNING."""
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            reply = httpx.get(f"{head.dashboard}/api/serve/applications/", timeout=5)
            apps = reply.json().get("applications", {}) if reply.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            apps = {}
        statuses = {name: app["status"] for name, app in apps.items()}
        failed = [_failure(name, apps[name]) for name, s in statuses.items() if "FAILED" in s]
        if failed:
            raise RuntimeError("\n".join(failed))
        if statuses and all(s == "RUNNING" for s in statuses.values()):
            return
        last = str(statuses or "no applications yet")
        time.sleep(1)
    raise TimeoutError(f"applications not RUNNING after {timeout_s:.0f}s: {last}")


def _failure(name: str, app: dict[str, Any]) -> str:
    """An application's failure with each unhealthy deployment's own message."""
    lines = [f"application {name!r}: {app.get('message', '')}"]
    for deployment, info in (app.get("deployments") or {}).items():
        if info.get("status") != "HEALTHY" and info.get("message"):
            lines.append(f"  deployment {deployment!r}: {info['message']}")
    return "\n".join(lines)


def tier_names(config: Path) -> list[str]:
    """The tiers of a source config (the application's `args`) or of a rendered one (the
    router's `user_config`, `serve_app.serve_config`)."""
    for app in yaml.safe_load(config.read_text()).get("applications") or []:
        sources = [app.get("args") or {}]
        sources += [d.get("user_config") or {} for d in app.get("deployments") or []]
        for source in sources:
            names = [tier["name"] for tier in source.get("tiers") or []]
            if names:
                return names
    return ["?"]


def http_port(config: Path) -> int:
    return int(yaml.safe_load(config.read_text()).get("http_options", {}).get("port", 8000))


def head_running(head: Head) -> bool:
    try:
        return httpx.get(f"{head.dashboard}/api/version", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


EXAMPLES = """
The stack is up: OpenAI-compatible API at {base}/v1 (tiers: {tiers}).

  curl {base}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "small", "temperature": 0, "messages": [{{"role": "user",
         "content": "What is the capital of France? Answer in one word."}}]}}'

  {python} -c '
from openai import OpenAI
client = OpenAI(base_url="{base}/v1", api_key="unused")
reply = client.chat.completions.create(model="{last}", temperature=0,
    messages=[{{"role": "user", "content": "What is the capital of France? Answer in one word."}}])
print(reply.choices[0].message.content)'

Ray head (this checkout's own): dashboard {dashboard}, metrics http://127.0.0.1:{metrics}/metrics,
GCS 127.0.0.1:{gcs}, logs in {temp_dir}.
Status: {bin}/serve status -a {dashboard}    Stop: {python} -m devstack.localstack down
Autoscaling (the small tier, 1 -> 2 replicas under a burst of requests): watch the replica count
with the status command above, and the decisions with
  grep -h 'autoscaling tier-' {temp_dir}/session_latest/logs/serve/controller_*.log
"""


# Settings of a tier that may name a file of this checkout (`./.vllm/...`).
PATH_SETTINGS = (("model_id",), ("tuning", "python"))


def with_absolute_paths(serve_config: dict[str, Any], root: Path) -> dict[str, Any]:
    """`serve_config` with every engine's `./` and `../` paths (`PATH_SETTINGS`) made absolute
    against `root`: Ray's workers, which start the engines, do not run in the checkout. Every
    tier's engine, wherever the config holds one (a source config's `tiers`, a rendered tier
    application's `tier`, the router's `user_config`)."""
    out = copy.deepcopy(serve_config)
    for engine in _engines(out):
        for path in PATH_SETTINGS:
            *parents, last = path
            node: Any = engine
            for key in parents:
                node = node.get(key) if isinstance(node, dict) else None
            value = node.get(last) if isinstance(node, dict) else None
            if isinstance(value, str) and value.startswith(("./", "../")):
                node[last] = os.path.normpath(root / value)  # a venv's python is a link
    return out


def _engines(node: Any) -> list[dict[str, Any]]:
    """Every `engine` mapping in a config, however deep."""
    if isinstance(node, list):
        return [engine for item in node for engine in _engines(item)]
    if not isinstance(node, dict):
        return []
    found = [node["engine"]] if isinstance(node.get("engine"), dict) else []
    return found + [e for key, value in node.items() if key != "engine" for e in _engines(value)]


def rendered(config: Path, root: Path, state: Path = STATE) -> Path:
    """`config` as deployed: its paths absolute (`with_absolute_paths`), written beside `state`."""
    serve_config = with_absolute_paths(yaml.safe_load(config.read_text()), root)
    out = state.parent / f"deployed-{config.name}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(serve_config, sort_keys=False))
    return out


def up(config: Path, state: Path = STATE) -> Head:
    """Deploy `config` on this checkout's own Ray head, starting it when none is running."""
    env = ray_env()
    head = Head.load(state)
    if head is None or not head_running(head) or not owned_processes(head):
        port = http_port(config)
        if not port_free(port):
            raise SystemExit(
                f"port {port} (http_options.port in {config}) is taken: stop what listens there "
                "or deploy a config with another port"
            )
        print("starting a local Ray head ...", flush=True)
        head = start_head(Head.private(prefer_defaults=True), env, prefer_defaults=True)
        head.save(state)
    print(f"deploying {config} ...", flush=True)
    deploy(rendered(config, Path.cwd(), state), head, env)
    wait_running(head)
    return head


def down(state: Path = STATE) -> None:
    """Shut down what `up` deployed and stop its Ray head; nothing else on the machine."""
    head = Head.load(state)
    if head is None:
        print(f"no local stack recorded in {state}: nothing to stop")
        return
    if head_running(head):
        # the head is stopped below either way
        with contextlib.suppress(subprocess.CalledProcessError):
            shutdown(head, ray_env())
    stop_head(head)
    state.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.localstack")
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument("--config", type=Path, default=Path("configs/local.yaml"))
    args = parser.parse_args(argv)
    if args.command == "down":
        down()
        return 0
    head = up(args.config)
    base = f"http://127.0.0.1:{http_port(args.config)}"
    tiers = tier_names(args.config)
    print(
        EXAMPLES.format(
            base=base,
            tiers=", ".join(tiers),
            last=tiers[-1],
            python=sys.executable,
            bin=BIN,
            dashboard=head.dashboard,
            metrics=head.metrics_port,
            gcs=head.gcs_port,
            temp_dir=head.temp_dir,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
