"""Queue-based autoscaling with real Ray Serve and real engines: burst, calm, zero."""

from __future__ import annotations

import glob
import os
import threading
import time
from typing import Any

import httpx

from tests.helpers import all_deployments, wait_for

from .conftest import Stack, local_config
from .test_supervision import QUESTION, one_tier

STORY = [{"role": "user", "content": "Tell me a long story about a comet."}]
BURST = 10  # streams: over the small tier's 4 per replica by more than the hysteresis


def running_replicas(stack: Stack, deployment: str = "tier-small") -> int:
    apps = httpx.get(f"{stack.head.dashboard}/api/serve/applications/", timeout=5).json()
    replicas = all_deployments(apps["applications"])[deployment]["replicas"]
    return sum(1 for replica in replicas if replica["state"] == "RUNNING")


def decisions(stack: Stack) -> list[str]:
    assert stack.head.temp_dir
    logs = glob.glob(os.path.join(stack.head.temp_dir, "session_latest/logs/serve/controller_*"))
    lines = []
    for path in logs:
        with open(path, errors="replace") as log:
            lines += [line for line in log if "autoscaling tier-small:" in line]
    return lines


def test_a_queue_scales_the_tier_up_and_calm_scales_it_back(ray_head: Stack) -> None:
    """On the shipped configs/local.yaml, as `make up` deploys it."""
    ray_head.deploy(local_config())
    assert running_replicas(ray_head) == 1
    client = ray_head.openai()
    failures: list[BaseException] = []
    done: list[str] = []

    def stream() -> None:
        try:
            chunks = client.chat.completions.create(
                model="small", max_tokens=120, stream=True, timeout=180, temperature=0.7,
                messages=[{"role": "user", "content": "Tell me a long story about a comet."}],
            )  # fmt: skip
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            done.append(finish or "")
        except BaseException as exc:
            failures.append(exc)

    burst = [threading.Thread(target=stream) for _ in range(BURST)]
    started = time.monotonic()
    for t in burst:
        t.start()
    wait_for(lambda: bool(decisions(ray_head)), 10, "a scale-up decision within 10 s")
    decided_after = time.monotonic() - started
    assert "1 -> 2 replicas" in decisions(ray_head)[0]
    wait_for(lambda: running_replicas(ray_head) == 2, 60, "the second replica to run")
    for t in burst:
        t.join(180)
    assert not failures and len(done) == BURST, failures
    assert decided_after < 10
    wait_for(lambda: running_replicas(ray_head) == 1, 90, "scale-down after the 30 s calm")
    assert "2 -> 1 replicas" in decisions(ray_head)[-1]


def tier_at_zero(**changes: Any) -> dict[str, Any]:
    return one_tier(replicas={"min": 0, "max": 1}, scaling={"downscale_delay_s": 600}, **changes)


def test_a_tier_at_zero_answers_its_first_request(ray_head: Stack) -> None:
    ray_head.deploy(tier_at_zero())
    assert running_replicas(ray_head) == 0
    assert {m.id for m in ray_head.openai().models.list()} >= {"small"}
    reply = ray_head.openai().chat.completions.create(
        model="small", messages=QUESTION, max_tokens=8, temperature=0, timeout=180
    )
    assert "Paris" in (reply.choices[0].message.content or "")
    assert running_replicas(ray_head) == 1


def test_a_tier_that_cannot_start_gives_503_not_a_hang(ray_head: Stack) -> None:
    ray_head.deploy(
        tier_at_zero(
            engine={"model_id": "/models/missing.gguf"},
            replica_wait_timeout_s=20,
            tuning={"max_start_attempts": 1},
        )
    )
    started = time.monotonic()
    reply = httpx.post(
        f"{ray_head.url}/v1/chat/completions",
        json={"model": "small", "messages": QUESTION, "max_tokens": 8},
        timeout=120,
    )
    assert reply.status_code == 503
    assert reply.headers["retry-after"]
    assert reply.json()["error"]["type"] == "server_error"
    # Refused once the router sees the start fail, not at the end of the replica wait, and
    # with the engine's reason (`serve_app.router.tier_states`).
    refused_in = time.monotonic() - started
    assert refused_in < 20, refused_in
    message = reply.json()["error"]["message"]
    assert message.startswith("tier 'small' failed to start: engine for tier 'small' exited"), (
        message
    )


def test_requests_waiting_in_the_routers_admission_queue_scale_the_tier(ray_head: Stack) -> None:
    """One turn per router: the engines never see more than one request, so only the
    admission queue's length (reported by the router to the tier) can call for a replica."""
    admission = {"max_in_flight": 1, "max_wait_s": 170,
                 "tuning": {"max_queued": 64, "reserved_turns": 0}}  # fmt: skip
    scaling = {"target_per_replica": 6, "upscale_delay_s": 1, "downscale_delay_s": 600}
    ray_head.deploy(one_tier(replicas={"min": 1, "max": 2}, scaling=scaling, admission=admission))
    assert running_replicas(ray_head) == 1
    replies: list[int] = []

    def ask() -> None:
        reply = httpx.post(
            f"{ray_head.url}/v1/chat/completions",
            json={"model": "small", "messages": STORY, "max_tokens": 64, "temperature": 0.7},
            timeout=180,
        )
        replies.append(reply.status_code)

    waiting = [threading.Thread(target=ask) for _ in range(20)]
    for t in waiting:
        t.start()
    wait_for(lambda: bool(decisions(ray_head)), 20, "a scale-up decision")
    assert "1 -> 2 replicas" in decisions(ray_head)[0]
    for t in waiting:
        t.join(180)
    assert replies == [200] * 20
