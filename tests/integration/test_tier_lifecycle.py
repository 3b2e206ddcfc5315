"""Each tier its own Serve application, through the real local stack: a `serve deploy` that
changes one tier restarts that tier's replica and engine only; one that changes live settings
restarts nothing, and the routers apply it."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

from tests.helpers import all_deployments, wait_for

from .conftest import Stack, local_config

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def tier(config: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [t for t in config["applications"][0]["args"]["tiers"] if t["name"] == name]
    return found


def replicas(stack: Stack) -> dict[str, set[str]]:
    """Each deployment's running replicas, as Ray actor ids."""
    apps = httpx.get(f"{stack.head.dashboard}/api/serve/applications/", timeout=10).json()
    return {
        name: {r["actor_id"] for r in deployment["replicas"] if r["state"] == "RUNNING"}
        for name, deployment in all_deployments(apps["applications"]).items()
    }


def engines(stack: Stack) -> dict[str, set[int]]:
    """Engine pids by tier, told apart by their `--max-input-tokens` (small 1536, large 3072)."""
    by_tier: dict[str, set[int]] = {"small": set(), "large": set()}
    for pid, argv in stack.engines().items():
        size = argv[argv.index("--max-input-tokens") + 1]
        by_tier["small" if size == "1536" else "large"].add(pid)
    return by_tier


def ask(stack: Stack, model: str, **body: Any) -> httpx.Response:
    return httpx.post(
        f"{stack.url}/v1/chat/completions",
        json={"model": model, "messages": QUESTION, "temperature": 0, **body},
        timeout=60,
    )


@pytest.fixture(scope="module")
def stack(ray_head: Stack) -> Stack:
    config = local_config()
    tier(config, "small")["replicas"] = {"min": 1, "max": 1}  # no scale-up to wait out
    ray_head.deploy(config)
    return ray_head


class ClientLoop:
    """Requests to one tier, one after the other, for as long as it runs; every failure kept."""

    def __init__(self, stack: Stack, model: str) -> None:
        self.statuses: list[int] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(stack, model))

    def _run(self, stack: Stack, model: str) -> None:
        while not self._stop.is_set():
            try:
                reply = ask(stack, model, max_tokens=4)
                self.statuses.append(reply.status_code)
                if reply.status_code != 200:
                    self.errors.append(reply.text)
            except httpx.HTTPError as exc:
                self.errors.append(repr(exc))

    def __enter__(self) -> ClientLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


def test_a_live_change_replaces_no_replica_and_the_router_applies_it(stack: Stack) -> None:
    before, engines_before = replicas(stack), engines(stack)
    assert ask(stack, "large", max_tokens=200).status_code == 200
    config = local_config()
    tier(config, "small")["replicas"] = {"min": 1, "max": 1}
    large = tier(config, "large")
    large["default_max_tokens"] = 64  # one tier's default: the router's setting only
    large["max_tokens_limit"] = 100
    tier(config, "small")["scaling"] = {"target_per_replica": 3}
    config["applications"][0]["args"]["router"]["tuning"] = {"max_messages": 500}
    with ClientLoop(stack, "small") as loop:
        stack.deploy(config)

        def applied() -> bool:
            return ask(stack, "large", max_tokens=200).status_code == 400

        wait_for(applied, 60, "the router to refuse max_tokens over large's new limit")
        time.sleep(3)  # what a replacement would have started by now
    refused = ask(stack, "large", max_tokens=200).json()["error"]
    assert refused["param"] == "max_tokens"
    assert replicas(stack) == before
    assert engines(stack) == engines_before
    assert loop.statuses and not loop.errors, loop.errors


def test_changing_one_tiers_engine_restarts_that_tier_only(stack: Stack) -> None:
    before, engines_before = replicas(stack), engines(stack)
    config = local_config()
    small = tier(config, "small")
    small["replicas"] = {"min": 1, "max": 1}
    small["engine"]["tuning"]["max_concurrent_requests"] = 48  # an engine flag
    # the live settings of the test above, unchanged
    large = tier(config, "large")
    large["default_max_tokens"], large["max_tokens_limit"] = 64, 100
    small["scaling"] = {"target_per_replica": 3}
    config["applications"][0]["args"]["router"]["tuning"] = {"max_messages": 500}
    with ClientLoop(stack, "large") as loop:
        stack.deploy(config, wait=False)

        def restarted() -> bool:
            now = replicas(stack).get("tier-small", set())  # absent while it is rebuilt
            return bool(now) and not now & before["tier-small"]

        wait_for(restarted, 300, "a new replica of tier small")
        wait_for(lambda: ask(stack, "small", max_tokens=4).status_code == 200, 120, "small")
        # the old replica drains, then stops its engine
        wait_for(lambda: not engines(stack)["small"] & engines_before["small"], 120, "old engine")
    after, engines_after = replicas(stack), engines(stack)
    assert after["tier-large"] == before["tier-large"]
    assert after["router"] == before["router"]
    assert engines_after["large"] == engines_before["large"]
    assert engines_after["small"] and not engines_after["small"] & engines_before["small"]
    (pid,) = engines_after["small"]
    argv = stack.engines()[pid]
    assert argv[argv.index("--max-concurrent-requests") + 1] == "48"
    print(f"client loop on tier large during the change: {len(loop.statuses)} requests, "
          f"{len(loop.errors)} failed")  # fmt: skip
    assert loop.statuses and not loop.errors, loop.errors
