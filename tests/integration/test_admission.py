"""Admission with real Ray Serve (simulated engines): a tier that lets one request run at a time,
and one of three turns with one kept for tenants below their fair share; three API keys, two
interactive and one batch."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest

from .conftest import Stack

KEYS = {
    "inter": "sk-interactive-key-00001",
    "batch": "sk-batch-key-000000000002",
    "light": "sk-light-interactive-0003",
}


def engine(slots: int) -> dict[str, Any]:
    return {
        "launcher": "local",
        "model_id": "simulated",
        "tuning": {"max_batch_size": slots},
        "extra_args": ["--sim-ttft-ms", "5", "--sim-itl-ms", "20", "--sim-output-tokens", "1000"],
    }


def config(keys_file: str) -> dict[str, Any]:
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1"},
        "applications": [{
            "name": "llm", "route_prefix": "/", "import_path": "serve_app.app:build_app",
            "args": {
                "router": {"api_keys": {"file": keys_file}},
                "tiers": [{
                    "name": "sim", "engine": engine(1), "default_max_tokens": 4,
                    "max_tokens_limit": 500,
                    "admission": {"max_in_flight": 1, "max_wait_s": 8,
                                  "tuning": {"max_queued": 2}},
                }, {
                    "name": "shared", "engine": engine(3), "default_max_tokens": 4,
                    "max_tokens_limit": 500,
                    "admission": {"max_in_flight": 3, "max_wait_s": 20,
                                  "tuning": {"reserved_turns": 1}},
                }],
            },
        }],
    }  # fmt: skip


@pytest.fixture(scope="module")
def stack(ray_head: Stack) -> Stack:
    keys = ray_head.workdir / "keys.json"
    keys.write_text(json.dumps([
        {"name": "inter", "key": KEYS["inter"]},
        {"name": "batch", "key": KEYS["batch"], "priority": "batch"},
        {"name": "light", "key": KEYS["light"]},
    ]))  # fmt: skip
    ray_head.deploy(config(str(keys)))
    return ray_head


def post(stack: Stack, who: str, tokens: int, model: str = "sim", **headers: str) -> httpx.Response:
    return httpx.post(
        f"{stack.url}/v1/completions",
        json={"model": model, "prompt": f"{who} asks", "max_tokens": tokens, "stream": False},
        headers={"authorization": f"Bearer {KEYS[who]}", **headers},
        timeout=60,
    )


def in_background(fn: Any) -> threading.Thread:
    thread = threading.Thread(target=fn)
    thread.start()
    return thread


@pytest.mark.parametrize("batch_header", [None, "interactive"])
def test_interactive_runs_before_batch_queued_before_it(
    stack: Stack, batch_header: str | None
) -> None:
    """Also when the batch key asks for `x-priority: interactive`: a key is never raised."""
    finished: dict[str, float] = {}
    raise_to = {"x-priority": batch_header} if batch_header else {}

    def run(label: str, who: str, tokens: int, **headers: str) -> None:
        assert post(stack, who, tokens, **headers).status_code == 200
        finished[label] = time.monotonic()

    holder = in_background(lambda: run("holder", "inter", 100))  # 2 s in the only turn
    time.sleep(0.5)
    batch = in_background(lambda: run("batch", "batch", 5, **raise_to))
    time.sleep(0.3)
    inter = in_background(lambda: run("inter", "inter", 5))
    for t in (holder, batch, inter):
        t.join(timeout=30)
    assert finished["inter"] < finished["batch"]  # arrived later, ran first


def test_a_full_queue_answers_429_with_retry_after_and_counts_recover(stack: Stack) -> None:
    holder = in_background(lambda: post(stack, "inter", 100))
    time.sleep(0.5)
    waiting = [in_background(lambda: post(stack, "batch", 2)) for _ in range(2)]
    time.sleep(0.5)
    refused = post(stack, "batch", 2)
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "8"
    error = refused.json()["error"]
    assert (
        error["code"] == "tier_queue_full" and "2 requests are already waiting" in error["message"]
    )
    for t in (holder, *waiting):
        t.join(timeout=30)
    # every turn was given back: the tier takes requests again at once
    assert post(stack, "inter", 2).status_code == 200


def test_an_unknown_priority_header_is_a_400_naming_it(stack: Stack) -> None:
    bad = post(stack, "inter", 2, **{"x-priority": "urgent"})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "x-priority"


def test_a_light_tenant_runs_at_once_on_the_turn_a_flooding_tenant_may_not_take(
    stack: Stack,
) -> None:
    """`shared` lets 3 requests run, one turn kept for tenants below their share: once the light
    tenant is active, the heavy one runs two at a time and the third turn waits for the light
    tenant, whose request then runs at once (no admission wait) instead of after a heavy one."""
    first = post(stack, "light", 2, model="shared")  # the light tenant is active from now
    assert first.status_code == 200
    heavy = [in_background(lambda: post(stack, "inter", 100, model="shared")) for _ in range(4)]
    time.sleep(0.8)  # two heavy requests run (2 s each), two wait
    start = time.monotonic()
    light = post(stack, "light", 2, model="shared")
    took = time.monotonic() - start
    assert light.status_code == 200
    assert light.headers["x-admission-wait-ms"] == "0"
    assert took < 1.0  # not behind a heavy request's 2 s
    for t in heavy:
        t.join(timeout=30)
    # every turn came back: the heavy tenant alone again runs at once
    again = post(stack, "inter", 2, model="shared")
    assert again.status_code == 200 and again.headers["x-admission-wait-ms"] == "0"
