"""The fault drill: a Ray cluster of three nodes on this machine (head + 2 workers, each in a
network namespace of its own, `devstack.cluster`), a tier with one replica on each worker, steady
client load through the head's HTTP ingress, and one worker node lost (every process in its
namespace SIGKILLed). What it shows (docs/operations.md#the-fault-drill): requests on the
surviving node never fail; those on the lost node fail fast with the router's error shape and
are few; the tier answers every request again within a bound, Serve replaces the lost replica on
the surviving node, and the router's in-flight gauges and a key's quota are right afterwards.
Prints one JSON line with the figures."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from devstack import cluster, localstack, netns
from devstack.cluster import Cluster
from devstack.hosts import engine_url, engines_under, free_port
from tests.helpers import metric_samples

pytestmark = pytest.mark.skipif(
    (reason := netns.available()) is not None, reason=f"no network namespaces: {reason}"
)

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
KEYS = {"load": "sk-drill-load-0123456789abcdef", "metered": "sk-drill-metered-0123456789ab"}
METERED_PER_MINUTE = 5
CLIENTS = 4
KILL_AFTER_S = 10
LOAD_S = 40
REQUEST_TIMEOUT_S = 30  # a request still unanswered then has hung
FAIL_FAST_S = 15  # the most a failed request may take
RECOVERY_BOUND_S = 60


def config(port: int, keys_file: Path) -> dict[str, Any]:
    simulated = {
        "launcher": "local",
        "model_id": "simulated",
        "tuning": {"max_batch_size": 8, "max_concurrent_requests": 64},
        "extra_args": ["--sim-ttft-ms", "20", "--sim-itl-ms", "20", "--sim-output-tokens", "1000"],
    }
    real = {
        "launcher": "local",
        "model_id": "smollm2-135m-instruct",
        "tuning": {"threads": 1, "max_batch_size": 1, "max_concurrent_requests": 4},
    }
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "0.0.0.0", "port": port},
        "applications": [{
            "name": "llm", "route_prefix": "/", "import_path": "serve_app.app:build_app",
            "args": {
                "router": {
                    "default_tier": "sim",
                    "ray_resources": {"drill_head": 0.01},
                    "api_keys": {"file": str(keys_file), "env": None},
                },
                "tiers": [
                    # one replica per worker node (Serve spreads them); each worker node has
                    # room for two, so the survivor can take the lost one's place
                    {"name": "sim", "engine": simulated, "replicas": {"min": 2, "max": 2},
                     "ray_resources": {"drill_worker": 1},
                     "default_max_tokens": 16, "max_tokens_limit": 64},
                    {"name": "real", "engine": real, "replicas": {"min": 1, "max": 1},
                     "ray_resources": {"drill_head": 0.5},
                     "default_max_tokens": 8, "max_tokens_limit": 64},
                ],
            },
        }],
    }  # fmt: skip


@dataclass
class Drill:
    cluster: Cluster
    env: dict[str, str]
    url: str

    def replicas(self, deployment: str) -> list[dict[str, Any]]:
        """A deployment's replicas, in whichever application holds it (each tier is its own)."""
        reply = httpx.get(f"{self.cluster.head.dashboard}/api/serve/applications/", timeout=10)
        for app in reply.json()["applications"].values():
            if deployment in app["deployments"]:
                return list(app["deployments"][deployment]["replicas"])
        raise KeyError(deployment)

    def engines(self) -> dict[str, str]:
        """The simulated engines' URLs by node address."""
        found = {}
        for argv in engines_under(self.env["TMPDIR"]).values():
            if "simulated" in argv:
                url = engine_url(argv)
                found[url.split("//")[1].split(":")[0]] = url
        return found

    def metric(self, name: str) -> dict[str, float]:
        head = self.cluster.head
        return metric_samples(head.metrics_port, name, head.host)


@pytest.fixture(scope="module")
def drill(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Drill]:
    workdir = tmp_path_factory.mktemp("drill")
    env = localstack.ray_env()
    env["TMPDIR"] = str(tmp_path_factory.mktemp("replicas"))  # marks this cluster's engines
    started = cluster.start(
        env,
        head_resources={"drill_head": 1},
        worker_resources={"drill_worker": 2},
    )
    try:
        keys = workdir / "keys.yaml"
        keys.write_text(yaml.safe_dump([
            {"name": "load", "key": KEYS["load"]},
            {"name": "metered", "key": KEYS["metered"], "requests_per_minute": METERED_PER_MINUTE},
        ]))  # fmt: skip
        port = free_port()
        path = workdir / "serve.yaml"
        path.write_text(yaml.safe_dump(config(port, keys)))
        localstack.deploy(path, started.head, started.env)
        localstack.wait_running(started.head, timeout_s=300)
        yield Drill(started, started.env, f"http://{started.head.host}:{port}")
    finally:
        started.destroy()


@dataclass
class Outcome:
    start: float
    end: float
    status: int  # 0: no answer (connection error or timeout)
    body: str

    @property
    def failed(self) -> bool:
        """Not answered 200, or a stream that ended with an error event (then `[DONE]`, as the
        router ends every stream) or without `[DONE]`."""
        if self.status != 200:
            return True
        if not self.body.startswith("data:"):
            return False
        return not self.body.rstrip().endswith("data: [DONE]") or '{"error"' in self.error

    @property
    def error(self) -> str:
        """The error as the router shaped it: the body, or a stream's last event."""
        if not self.body.startswith("data:"):
            return self.body
        events = [e.strip() for e in self.body.split("data:") if e.strip() not in ("", "[DONE]")]
        return events[-1] if events else ""


def load(url: str, stream: bool, stop: threading.Event, outcomes: list[Outcome]) -> None:
    """One client asking in a row until `stop`: whole answers, or streams."""
    headers = {"authorization": f"Bearer {KEYS['load']}"}
    body = {"model": "sim", "messages": QUESTION, "max_tokens": 16, "stream": stream}
    with httpx.Client(base_url=url, headers=headers, timeout=REQUEST_TIMEOUT_S) as client:
        while not stop.is_set():
            start = time.monotonic()
            try:
                reply = client.post("/v1/chat/completions", json=body)
                status, text = reply.status_code, reply.text
            except httpx.HTTPError as error:
                status, text = 0, repr(error)
            # a stream's first and last events (its end, or the error that ended it)
            text = text if len(text) < 600 else text[:200] + "..." + text[-400:]
            outcomes.append(Outcome(start, time.monotonic(), status, text))


def engine_counts(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    counts = {}
    for line in text.splitlines():
        for name in ("tgi_request_count", "tgi_request_success", "tgi_request_failure"):
            if line.startswith(name + " ") or line.startswith(name + "{"):
                counts[name] = counts.get(name, 0) + float(line.rsplit(" ", 1)[1])
    return counts


def router_error_shape(text: str) -> bool:
    try:
        error = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and bool(error.get("message")) and "type" in error


def test_losing_a_worker_node(drill: Drill) -> None:
    workers = {host.address: host for host in drill.cluster.workers}
    placed = sorted(r["node_ip"] for r in drill.replicas("tier-sim") if r["state"] == "RUNNING")
    assert placed == sorted(workers), f"the sim tier's replicas are not spread: {placed}"
    engines = drill.engines()
    assert sorted(engines) == sorted(workers), engines
    lost, survivor = drill.cluster.workers[1], drill.cluster.workers[0]
    survivor_before = engine_counts(engines[survivor.address])

    outcomes: list[Outcome] = []
    stop = threading.Event()
    clients = [  # half of them stream
        threading.Thread(target=load, args=(drill.url, n % 2 == 1, stop, outcomes))
        for n in range(CLIENTS)
    ]
    begin = time.monotonic()
    for client in clients:
        client.start()
    time.sleep(KILL_AFTER_S)
    at_engine = engine_counts(engines[lost.address])
    killed_at = time.monotonic()
    killed = lost.kill_all()
    # requests the lost node's engine had taken and not finished
    on_lost_node = (
        at_engine["tgi_request_count"]
        - at_engine.get("tgi_request_success", 0)
        - at_engine.get("tgi_request_failure", 0)
    )
    # the load goes on for LOAD_S in all, and until Serve has replaced the lost replica
    replaced_s = None
    while time.monotonic() - begin < LOAD_S or replaced_s is None:
        if time.monotonic() - killed_at > RECOVERY_BOUND_S + 30:
            break
        if replaced_s is None:
            running = [r for r in drill.replicas("tier-sim") if r["state"] == "RUNNING"]
            if len(running) == 2 and all(r["node_ip"] == survivor.address for r in running):
                replaced_s = time.monotonic() - killed_at
        time.sleep(1)
    stop.set()
    for client in clients:
        client.join(timeout=REQUEST_TIMEOUT_S + 5)
    assert not any(client.is_alive() for client in clients), "a client hung"

    failed = [o for o in outcomes if o.failed]
    last_failure = max((o.end for o in failed), default=killed_at)
    survivor_after = engine_counts(engines[survivor.address])
    survivor_failures = survivor_after.get("tgi_request_failure", 0) - survivor_before.get(
        "tgi_request_failure", 0
    )
    survivor_served = survivor_after.get("tgi_request_success", 0) - survivor_before.get(
        "tgi_request_success", 0
    )

    # after the drill: the router's in-flight gauges back at 0, a key's quota counted once
    def in_flight() -> float:
        return sum(drill.metric("ray_serve_app_in_flight_requests").values())

    deadline = time.monotonic() + 30
    while (left := in_flight()) != 0 and time.monotonic() < deadline:
        time.sleep(1)
    metered = {"authorization": f"Bearer {KEYS['metered']}"}
    body = {"model": "sim", "messages": QUESTION, "max_tokens": 4}
    quota = [
        httpx.post(f"{drill.url}/v1/chat/completions", json=body, headers=metered, timeout=30)
        for _ in range(METERED_PER_MINUTE + 1)
    ]
    real = httpx.post(
        f"{drill.url}/v1/chat/completions",
        json={"model": "real", "messages": QUESTION, "max_tokens": 8, "temperature": 0},
        headers={"authorization": f"Bearer {KEYS['load']}"},
        timeout=120,
    )

    statuses: dict[str, int] = {}
    for o in failed:
        statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
    figures = {
        "drill": "node-loss",
        "nodes": 3,
        "clients": CLIENTS,
        "requests": len(outcomes),
        "answered_200": len(outcomes) - len(failed),
        "failures_on_survivor": survivor_failures,
        "survivor_requests_served": survivor_served,
        "in_flight_on_lost_node_at_kill": on_lost_node,
        "failures_on_lost_node": len(failed),
        "failure_statuses": statuses,
        "slowest_failure_s": round(max((o.end - o.start for o in failed), default=0), 2),
        "processes_killed": killed,
        "recovery_s": round(last_failure - killed_at, 2),
        "replaced_on_survivor_s": None if replaced_s is None else round(replaced_s, 1),
        "in_flight_after": left,
        "quota_statuses": [r.status_code for r in quota],
        "real_engine_status": real.status_code,
    }
    print("\nDRILL " + json.dumps(figures), flush=True)
    near = [o for o in outcomes if killed_at - 1 <= o.end and o.start <= killed_at + 1]
    for o in sorted(near, key=lambda o: o.start):
        print(f"{o.start - killed_at:+.2f} {o.end - killed_at:+.2f} {o.status} {o.body[-160:]!r}")
    print("logs:", drill.cluster.head.temp_dir)

    assert survivor_failures == 0
    assert all(o.start >= killed_at - 1 for o in failed), "a request failed before the kill"
    assert all(o.status in (200, 500, 502, 503, 504) for o in failed), failed[:3]
    assert all(router_error_shape(o.error) for o in failed), failed[:3]
    assert all(o.end - o.start <= FAIL_FAST_S for o in failed), failed[:3]
    # bounded: only requests already running on the lost node fail (at most one per client);
    # those sent to it afterwards find its engine or replica gone and are sent again
    assert len(failed) <= CLIENTS, statuses
    assert last_failure - killed_at <= RECOVERY_BOUND_S
    assert replaced_s is not None, "Serve did not replace the lost replica on the survivor"
    assert left == 0, "requests left counted in flight"
    assert [r.status_code for r in quota] == [200] * METERED_PER_MINUTE + [429]
    assert real.status_code == 200, real.text
    assert real.json()["choices"][0]["message"]["content"]
