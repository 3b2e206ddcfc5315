"""Each tier's start-up state through the real local stack: a tier whose engine takes its time
to load shows `loading` and then `ready`, a tier whose engine exits shows `failed` with the
engine's reason, in `/v1/models`, `/v1/status`, the 503 a request gets and the
`ray_serve_app_tier_state` gauge."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import httpx

from tests.helpers import metric_samples, wait_for

from .conftest import Stack

LOAD_S = 40  # the simulated engine's load time: long enough to see it, and a metrics export


def engine(**more: Any) -> dict[str, Any]:
    return {"launcher": "local", "model_id": "simulated", "tuning": {"max_batch_size": 2}, **more}


def config() -> dict[str, Any]:
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1"},
        "applications": [{
            "name": "llm", "route_prefix": "/", "import_path": "serve_app.app:build_app",
            "args": {
                "router": {"default_tier": "slow"},
                "tiers": [
                    {"name": "slow", "engine": engine(extra_args=["--sim-load-s", str(LOAD_S)]),
                     "default_max_tokens": 4, "replica_wait_timeout_s": 3},
                    {"name": "broken", "engine": engine(model_id="/models/missing.gguf"),
                     "tuning": {"max_start_attempts": 1}, "default_max_tokens": 4},
                ],
            },
        }],
    }  # fmt: skip


def tiers(stack: Stack) -> dict[str, dict[str, Any]]:
    try:
        reply = httpx.get(f"{stack.url}/v1/status", timeout=5)
    except httpx.HTTPError:
        return {}
    if reply.status_code != 200:
        return {}
    return {t["tier"]: t for t in reply.json()["tiers"]}


def state(stack: Stack, tier: str) -> str | None:
    return tiers(stack).get(tier, {}).get("state")


def until(stack: Stack, tier: str, wanted: str, timeout_s: float) -> None:
    """Wait for `tier` to be in state `wanted`; the last status seen in the failure."""
    seen: list[Any] = []

    def reached() -> bool:
        seen.append(tiers(stack).get(tier))
        return bool(seen[-1]) and seen[-1]["state"] == wanted

    try:
        wait_for(reached, timeout_s, f"tier {tier} to be {wanted}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen: {seen[-1]!r}") from None


def ask(stack: Stack, model: str) -> httpx.Response:
    return httpx.post(
        f"{stack.url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        timeout=60,
    )


def gauge(stack: Stack, tier: str, value: str) -> float:
    samples = metric_samples(stack.head.metrics_port, "ray_serve_app_tier_state")
    return max(
        (v for labels, v in samples.items() if f'tier="{tier}"' in labels
         and f'state="{value}"' in labels),
        default=0.0,
    )  # fmt: skip


def test_a_cold_start_is_loading_then_ready_and_a_failed_start_says_why(ray_head: Stack) -> None:
    deployed = time.monotonic()
    ray_head.deploy(config(), wait=False)
    until(ray_head, "slow", "loading", LOAD_S)
    loading_at = time.monotonic() - deployed

    # A request to a tier still loading: a 503 that names the state, after the replica wait.
    refused = ask(ray_head, "slow")
    assert refused.status_code == 503, refused.text
    message = refused.json()["error"]["message"]
    assert "tier 'slow' is loading its model (started " in message, message
    assert refused.headers["retry-after"] == "15"
    slow = tiers(ray_head)["slow"]
    assert [r["phase"] for r in slow["replicas"]] == ["loading"]
    models = {m["id"]: m for m in httpx.get(f"{ray_head.url}/v1/models", timeout=5).json()["data"]}
    assert models["slow"]["status"]["state"] == "loading"

    # The broken tier: Serve gives up after its one attempt, with the engine's reason.
    until(ray_head, "broken", "failed", 120)
    failed_at = time.monotonic() - deployed
    broken = tiers(ray_head)["broken"]
    assert "'/models/missing.gguf' is neither a built-in model" in broken["reason"]
    started = time.monotonic()
    refused = ask(ray_head, "broken")
    refused_in = time.monotonic() - started
    assert refused.status_code == 503 and refused.headers["retry-after"] == "60"
    assert "tier 'broken' failed to start: " in refused.json()["error"]["message"]
    assert refused_in < 2, refused_in  # at once, not after the replica wait

    wait_for(lambda: gauge(ray_head, "slow", "loading") == 1.0 or state(ray_head, "slow")
             == "ready", 30, "the loading gauge")  # fmt: skip
    wait_for(lambda: gauge(ray_head, "broken", "failed") == 1.0, 30, "the failed gauge")
    until(ray_head, "slow", "ready", LOAD_S + 60)
    ready_at = time.monotonic() - deployed
    assert ask(ray_head, "slow").status_code == 200
    wait_for(lambda: gauge(ray_head, "slow", "ready") == 1.0, 30, "the ready gauge")
    assert gauge(ray_head, "slow", "loading") == 0.0

    # The status command, against the same router.
    command = [sys.executable, "-m", "serve_app.status", "--url", ray_head.url]
    shown = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 1, shown.stderr  # a tier failed
    lines = shown.stdout.splitlines()
    assert any(line.startswith("slow ") and " ready " in line for line in lines), shown.stdout
    assert any(line.startswith("broken ") and " failed " in line for line in lines)
    assert "'/models/missing.gguf' is neither a built-in model" in shown.stdout
    as_json = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=60)
    assert {t["tier"]: t["state"] for t in json.loads(as_json.stdout)["tiers"]} == {
        "slow": "ready", "broken": "failed"
    }  # fmt: skip
    print(
        f"\nloading seen {loading_at:.1f}s after deploy, failed {failed_at:.1f}s, ready "
        f"{ready_at:.1f}s (engine load {LOAD_S}s); failed tier refused in "
        f"{refused_in * 1000:.0f} ms"
    )
