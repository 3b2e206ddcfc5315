"""Replica choice with real Ray Serve: two replicas of a tier, each with its own engine process
(the simulated model: timing without compute); which engine served is read from its metrics."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest

from devstack.hosts import engine_url
from serve_app.engine.stats import parse_load
from tests.helpers import wait_for

from .conftest import Stack

ITL_MS = 20


def routed_tier(prefix_affinity: bool, **tuning: Any) -> dict[str, Any]:
    engine = {
        "launcher": "local",
        "model_id": "simulated",
        "tuning": {"max_batch_size": 1, "max_concurrent_requests": 64},
        "extra_args": ["--sim-ttft-ms", "5", "--sim-itl-ms", str(ITL_MS),
                       "--sim-output-tokens", "1000"],
    }  # fmt: skip
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1"},
        "applications": [{
            "name": "llm", "route_prefix": "/", "import_path": "serve_app.app:build_app",
            "args": {"tiers": [{
                "name": "sim", "engine": engine, "replicas": {"min": 2, "max": 2},
                "default_max_tokens": 4, "max_tokens_limit": 500,
                "routing": {"prefix_affinity": prefix_affinity, "tuning": {
                    "token_time_s": ITL_MS / 1000, "stats_period_s": 0.25, **tuning}},
            }]},
        }],
    }  # fmt: skip


def engine_counts(stack: Stack) -> dict[str, float]:
    """Requests each engine has received so far (`tgi_request_count`), by engine URL."""
    counts = {}
    for argv in stack.engines().values():
        url = engine_url(argv)
        line = next(x for x in _metrics(url).splitlines() if x.startswith("tgi_request_count "))
        counts[url] = float(line.split()[-1])
    return counts


def delta(before: dict[str, float], after: dict[str, float]) -> list[float]:
    return sorted(after[p] - before[p] for p in after)


def complete(stack: Stack, prompt: str, tokens: int = 2, **headers: str) -> None:
    reply = httpx.post(
        f"{stack.url}/v1/completions",
        json={"model": "sim", "prompt": prompt, "max_tokens": tokens},
        headers=headers,
        timeout=60,
    )
    assert reply.status_code == 200, reply.text


@pytest.fixture(scope="module")
def stack(ray_head: Stack) -> Stack:
    ray_head.deploy(routed_tier(prefix_affinity=True, prefix_chars=32))
    assert len(ray_head.engines()) == 2
    return ray_head


def test_a_shared_prefix_stays_on_one_replica_and_prefixes_spread(stack: Stack) -> None:
    homes = set()
    for p in range(8):
        before = engine_counts(stack)
        for user in range(4):
            complete(stack, f"SYSTEM PROMPT NUMBER {p:03d} ............. user {user} asks")
        after = engine_counts(stack)
        assert delta(before, after) == [0, 4], f"prefix {p}: {delta(before, after)}"
        homes.add(max(after, key=lambda port: after[port] - before[port]))
    assert len(homes) == 2  # eight prefixes did not all hash to one replica


def test_a_session_header_pins_a_conversation(stack: Stack) -> None:
    before = engine_counts(stack)
    for turn in range(6):
        complete(stack, f"turn {turn}: a different prompt each time {turn * 7919}",
                 **{"x-session-id": "conversation-42"})  # fmt: skip
    assert delta(before, engine_counts(stack)) == [0, 6]


def test_requests_avoid_a_replica_busy_with_a_long_generation(stack: Stack) -> None:
    prompt = "SYSTEM PROMPT NUMBER 000 ............. long one"
    long_done = threading.Event()

    def long_generation() -> None:
        complete(stack, prompt, tokens=250)  # 5 s in the busy engine's only slot
        long_done.set()

    before = engine_counts(stack)
    worker = threading.Thread(target=long_generation)
    worker.start()

    def busy() -> bool:
        return any(parse_load(_metrics(url)).running for url in before)

    wait_for(busy, 10, "the long generation to start")
    hot = next(url for url in before if parse_load(_metrics(url)).running)
    # Same prefix (its home may be the busy replica) and fresh prompts: all go elsewhere,
    # since the busy replica's expected wait is seconds, past the affinity margin.
    mid = engine_counts(stack)
    for user in range(6):
        complete(stack, f"SYSTEM PROMPT NUMBER 000 ............. user {user} again")
        complete(stack, f"a prompt of its own {user}")
    after = engine_counts(stack)
    assert not long_done.is_set(), "the long generation ended before the check"
    assert after[hot] - mid[hot] == 0
    assert sum(after.values()) - sum(mid.values()) == 12
    worker.join(timeout=30)


def _metrics(engine: str) -> str:
    return httpx.get(f"{engine}/metrics", timeout=5).text
