"""API keys, quotas across router replicas and overload shedding (the fuzz run of every route is
in test_request_scope.py)."""

from __future__ import annotations

import asyncio
import glob
import json
import os
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from devstack.hosts import router_addresses
from tests.helpers import lease_grants, metric_samples, settled_value, wait_for

from .conftest import Stack, local_config

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
KEYS = {
    "team-a": "sk-team-a-0123456789abcdef",
    "small-only": "sk-small-only-0123456789abcdef",
    "metered": "sk-metered-0123456789abcdef",
    "token-metered": "sk-tokens-0123456789abcdef",
}
REQUESTS_PER_MINUTE = 6
KEYS_FILE: list[Path] = []  # where the module's stack reads its keys


@pytest.fixture(scope="module")
def stack(ray_head: Stack, tmp_path_factory: pytest.TempPathFactory) -> Stack:
    keys = [
        {"name": "team-a", "key": KEYS["team-a"]},
        {"name": "small-only", "key": KEYS["small-only"], "tiers": ["small"]},
        {"name": "metered", "key": KEYS["metered"], "requests_per_minute": REQUESTS_PER_MINUTE},
        {"name": "token-metered", "key": KEYS["token-metered"], "tokens_per_minute": 150},
    ]
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    path.write_text(yaml.safe_dump(keys))
    KEYS_FILE.append(path)
    config = local_config()
    args = config["applications"][0]["args"]
    args["router"].update({"replicas": 2, "api_keys": {"file": str(path)}})
    for tier in args["tiers"]:
        tier["default_max_tokens"] = 4  # keeps the fuzz run's valid requests short
    small = args["tiers"][0]
    small.pop("overflow_tier")
    # one replica (no autoscaling here): its 2 slots are the tier's
    # no spare lease: these tests count the leases requests take
    small["replicas"] = {"min": 1, "max": 1}
    small.setdefault("tuning", {}).update(
        {"max_ongoing_requests": 2, "max_queued_requests": 2, "lease_spare_s": 0})  # fmt: skip
    small["engine"].setdefault("tuning", {}).update(
        {"max_batch_size": 1, "max_concurrent_requests": 2})  # fmt: skip
    ray_head.deploy(config)
    return ray_head


def call(stack: Stack, key: str | None, model: str = "small", **headers: str) -> httpx.Response:
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    body = {"model": model, "messages": QUESTION, "max_tokens": 4}
    return httpx.post(f"{stack.url}/v1/chat/completions", json=body, headers=headers, timeout=60)


def test_keys_are_required_and_checked(stack: Stack) -> None:
    missing = call(stack, None)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert call(stack, "sk-wrong-0123456789abcdef").status_code == 401
    assert call(stack, KEYS["team-a"]).status_code == 200
    by_header = call(stack, None, **{"x-api-key": KEYS["team-a"]})
    assert by_header.status_code == 200
    tgi = httpx.post(f"{stack.url}/generate", json={"inputs": "Hi"}, timeout=60)
    assert tgi.status_code == 401 and set(tgi.json()) == {"error", "error_type"}
    assert httpx.get(f"{stack.url}/health", timeout=10).status_code == 200  # stays open


def test_a_key_may_only_use_its_tiers(stack: Stack) -> None:
    assert call(stack, KEYS["small-only"], "small").status_code == 200
    forbidden = call(stack, KEYS["small-only"], "large")
    assert forbidden.status_code == 403
    assert forbidden.json()["error"]["code"] == "tier_not_allowed"


def test_two_router_replicas_enforce_one_request_quota(stack: Stack) -> None:
    statuses = [call(stack, KEYS["metered"]).status_code for _ in range(3 * REQUESTS_PER_MINUTE)]
    admitted = statuses.count(200)
    # Leases come out of one shared bucket: never above the limit. One lease (10 % of 6,
    # at least 1) may sit unused in the other replica: at most one below.
    assert REQUESTS_PER_MINUTE - 1 <= admitted <= REQUESTS_PER_MINUTE, statuses
    refused = call(stack, KEYS["metered"])
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(refused.headers["retry-after"]) >= 1


def test_a_token_quota_stops_a_key_once_spent(stack: Stack) -> None:
    statuses = []
    for _ in range(12):
        statuses.append(call(stack, KEYS["token-metered"]).status_code)
        time.sleep(0.2)  # token use is charged just after each answer
    assert 200 in statuses and 429 in statuses
    assert statuses.index(429) <= 5  # about 50 tokens an answer against 150 a minute


def test_keys_never_reach_logs_or_metrics(stack: Stack) -> None:
    assert stack.head.temp_dir
    logs = glob.glob(os.path.join(stack.head.temp_dir, "session_latest", "logs", "**", "*"),
                     recursive=True)  # fmt: skip
    for path in filter(os.path.isfile, logs):
        text = Path(path).read_bytes()
        for key in KEYS.values():
            assert key.encode() not in text, path
    metrics = httpx.get(f"http://127.0.0.1:{stack.head.metrics_port}/metrics", timeout=10).text
    assert not any(key in metrics for key in KEYS.values())


def test_ten_times_capacity_is_shed_fast_and_service_recovers(stack: Stack) -> None:
    # The small tier holds 1 running + 1 queued in the engine, 2 per replica, 2 queued in Serve.
    async def burst() -> list[tuple[int, float, str]]:
        headers = {"authorization": f"Bearer {KEYS['team-a']}"}
        body = {"model": "small", "messages": QUESTION, "max_tokens": 32}
        async with httpx.AsyncClient(base_url=stack.url, timeout=120, headers=headers) as client:

            async def one() -> tuple[int, float, str]:
                start = time.perf_counter()
                reply = await client.post("/v1/chat/completions", json=body)
                return (
                    reply.status_code,
                    time.perf_counter() - start,
                    reply.headers.get("retry-after", ""),
                )

            return await asyncio.gather(*(one() for _ in range(40)))

    results = asyncio.run(burst())
    statuses = sorted({status for status, _, _ in results})
    assert set(statuses) <= {200, 429}, statuses
    refusals = sorted(t for status, t, _ in results if status == 429)
    assert refusals and all(after for status, _, after in results if status == 429)
    p99 = refusals[min(len(refusals) - 1, int(0.99 * len(refusals)))]
    print(json.dumps({"admitted": len(results) - len(refusals), "refused": len(refusals),
                      "refusal_p99_ms": round(p99 * 1000, 1)}))  # fmt: skip
    assert p99 < 2.0
    assert call(stack, KEYS["team-a"]).status_code == 200


def test_a_full_replica_takes_its_leases_back_from_the_routers(stack: Stack) -> None:
    """The small tier's one replica takes 2 requests at once (`max_ongoing_requests`). One client
    asking in a row reuses its router's lease; two clients at once fill the replica, which then
    asks for every lease back after its request (requests waiting in Serve for a slot get it in
    Serve's order), so their requests take leases of their own."""
    base = f"http://{router_addresses(stack.head.temp_dir)[0]}"
    headers = {"authorization": f"Bearer {KEYS['team-a']}"}
    body = {"model": "small", "messages": QUESTION, "max_tokens": 4}

    def in_a_row(count: int, together: threading.Barrier | None = None) -> None:
        with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
            for _ in range(count):
                if together:
                    together.wait(timeout=60)
                assert client.post("/v1/chat/completions", json=body).status_code == 200

    def grants() -> float:
        return lease_grants(stack.head.metrics_port, "small")

    before = settled_value(grants)
    in_a_row(6)
    wait_for(lambda: grants() > before, 60, "the grants counted")
    alone = settled_value(grants)
    assert 1 <= alone - before <= 2, alone - before

    # Both clients start each of their requests at the same moment: one finds the kept lease,
    # the other takes a fresh one, which fills the replica; the replica asks the older lease
    # back, so every round starts with one kept lease again and takes one fresh one.
    rounds = threading.Barrier(2)

    async def two_at_once() -> None:
        await asyncio.gather(*(asyncio.to_thread(in_a_row, 4, rounds) for _ in range(2)))

    asyncio.run(two_at_once())
    wait_for(lambda: grants() > alone, 60, "the grants counted")
    together = settled_value(grants) - alone
    assert 4 <= together <= 8, together  # leases never asked back: 1


def test_a_broken_keys_file_keeps_the_last_good_keys_and_says_so(stack: Stack) -> None:
    """Last: the file is broken, then restored. Both router replicas keep answering with the
    last good keys, and `ray_serve_app_api_keys_stale` is 1 until the file is good again."""
    path = KEYS_FILE[0]
    good = path.read_text()

    def stale() -> float:
        """The gauge, once a request has made the replica it reached look at the file."""
        assert call(stack, KEYS["team-a"]).status_code == 200  # the last good keys answer
        samples = metric_samples(stack.head.metrics_port, "ray_serve_app_api_keys_stale")
        return max(samples.values(), default=-1.0)

    try:
        path.write_text("- name: [unclosed")
        wait_for(lambda: stale() == 1, 90, "the stale-keys gauge to rise")
    finally:
        path.write_text(good)
    wait_for(lambda: stale() == 0, 90, "the stale-keys gauge to fall")
