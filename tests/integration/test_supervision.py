"""Engine supervision under faults: bad models, killed replicas and engines, scale-down."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack import localstack
from devstack.hosts import engine_url
from tests.helpers import wait_for

from .conftest import Stack, local_config

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def one_tier(**changes: Any) -> dict[str, Any]:
    """The shipped config cut down to its small tier, with `changes` applied to that tier
    (its `tuning` and its engine's merged into theirs)."""
    config = local_config()
    args = config["applications"][0]["args"]
    tier = args["tiers"][0]
    tier.pop("overflow_tier", None)  # the tiers it could name are gone
    engine_changes = changes.pop("engine", {})
    tier.setdefault("tuning", {}).update(changes.pop("tuning", {}))
    tier.update(changes)
    tier["engine"].setdefault("tuning", {}).update(engine_changes.pop("tuning", {}))
    tier["engine"].update(engine_changes)
    args["tiers"] = [tier]
    args["router"].pop("auto_rules", None)
    return config


def parent_of(pid: int) -> int:
    return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])


def answers(stack: Stack) -> bool:
    try:
        reply = stack.openai().chat.completions.create(
            model="small", messages=QUESTION, max_tokens=8, temperature=0, timeout=30
        )
    except Exception:
        return False
    return "Paris" in (reply.choices[0].message.content or "")


def test_bad_model_fails_the_deployment_with_the_engines_reason(ray_head: Stack) -> None:
    ray_head.deploy(
        one_tier(engine={"model_id": "/models/missing.gguf"}, tuning={"max_start_attempts": 1}),
        wait=False,
    )
    with pytest.raises(RuntimeError) as failure:
        localstack.wait_running(ray_head.head, timeout_s=180)
    message = str(failure.value)
    assert "exited with code 1 during start-up" in message
    assert "'/models/missing.gguf' is neither a built-in model" in message
    wait_for(lambda: not ray_head.engines(), 10, "no engine left by the failed starts")


def test_replica_killed_with_sigkill_leaves_no_engine(ray_head: Stack) -> None:
    ray_head.deploy(one_tier())
    (engine,) = ray_head.engines()
    replica = parent_of(engine)
    assert (Path("/proc") / str(replica) / "cmdline").read_bytes().startswith(b"ray::")
    os.kill(replica, signal.SIGKILL)
    wait_for(lambda: engine not in ray_head.engines(), 10, "the orphaned engine to exit")
    wait_for(lambda: answers(ray_head), 120, "a replacement replica that answers")


def replica_log_lines(stack: Stack, text: str) -> list[str]:
    logs = Path(stack.head.temp_dir) / "session_latest" / "logs" / "serve"
    return [
        line
        for path in logs.glob("replica_*tier-small*.log")
        for line in path.read_text(errors="replace").splitlines()
        if text in line
    ]


def test_an_engine_that_dies_while_serving_takes_its_replica_with_it(ray_head: Stack) -> None:
    ray_head.deploy(one_tier(replicas={"min": 2, "max": 2}))
    engines = ray_head.engines()
    assert len(engines) == 2
    victim = next(iter(engines))
    replica = parent_of(victim)
    assert answers(ray_head)  # the router now keeps leases on the tier
    os.kill(victim, signal.SIGKILL)
    # At once, not at the replica's next health check: its leases end with it.
    wait_for(lambda: not (Path("/proc") / str(replica)).exists(), 10, "the replica to exit")
    why = "engine exited with code -9 while serving"
    wait_for(lambda: replica_log_lines(ray_head, why), 10, "the replica's last words")
    # The other replica answers meanwhile, and Serve restores the second one.
    assert all(answers(ray_head) for _ in range(5))
    wait_for(lambda: len(ray_head.engines()) == 2, 120, "a replacement engine")
    localstack.wait_running(ray_head.head, timeout_s=120)


def test_engine_killed_during_start_up_is_retried(ray_head: Stack) -> None:
    ray_head.deploy(one_tier(engine={"tuning": {"max_batch_size": 3}}), wait=False)
    killed: list[int] = []

    def kill_a_starting_engine() -> bool:
        for pid, argv in ray_head.engines().items():
            if argv[argv.index("--max-batch-size") + 1] == "3":
                try:
                    httpx.get(f"{engine_url(argv)}/health", timeout=0.2)
                    return False  # already serving: too late to count as start-up
                except httpx.HTTPError:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return True
        return False

    wait_for(kill_a_starting_engine, 60, "an engine that is still starting")
    localstack.wait_running(ray_head.head, timeout_s=180)
    assert killed[0] not in ray_head.engines()
    assert answers(ray_head)


def test_scale_down_lets_in_flight_streams_finish(ray_head: Stack) -> None:
    ray_head.deploy(one_tier(replicas={"min": 2, "max": 2}))
    assert len(ray_head.engines()) == 2
    client = ray_head.openai()
    results: list[tuple[str | None, str]] = []
    started = threading.Barrier(5)

    def stream() -> None:
        chunks = client.chat.completions.create(
            model="small", max_tokens=200, stream=True, timeout=120,
            messages=[{"role": "user", "content": "Tell me a long story about a lighthouse."}],
        )  # fmt: skip
        finish, text, first = None, "", True
        for chunk in chunks:
            if first:
                started.wait(60)
                first = False
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        results.append((finish, text))

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for t in threads:
        t.start()
    started.wait(60)  # every stream has its first token
    ray_head.deploy(one_tier(replicas={"min": 1, "max": 1}), wait=False)
    for t in threads:
        t.join(180)
    assert len(results) == 4
    assert all(finish in ("stop", "length") and text for finish, text in results), results
    localstack.wait_running(ray_head.head, timeout_s=120)
    wait_for(lambda: len(ray_head.engines()) == 1, 60, "one engine after scale-down")
