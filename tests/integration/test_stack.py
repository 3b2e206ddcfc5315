"""The whole path: `serve deploy` of the shipped config, then real clients over HTTP.

One Ray head for the module; the last test shuts the application down and checks that no engine
process is left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess

import httpx
import pytest
import yaml
from openai import NotFoundError

from devstack import localstack
from tests.helpers import all_deployments, wait_for

from .conftest import Stack, local_config

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def stack(ray_head: Stack) -> Stack:
    ray_head.deploy(local_config())
    return ray_head


def tier_engines(stack: Stack, max_batch_size: str) -> set[int]:
    """Engine pids of one tier, told apart by the tier's batch size in their argv."""
    return {
        pid
        for pid, argv in stack.engines().items()
        if argv[argv.index("--max-batch-size") + 1] == max_batch_size
    }


@pytest.mark.parametrize("model", ["small", "gpt-4o-mini", "large", "gpt-4o"])
def test_openai_chat_on_every_tier(stack: Stack, model: str) -> None:
    client = stack.openai()
    reply = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=16, temperature=0
    )
    assert "Paris" in reply.choices[0].message.content
    assert reply.model == model and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model=model, messages=QUESTION, max_tokens=16, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_openai_completions_streamed_and_not(stack: Stack) -> None:
    client = stack.openai()
    reply = client.completions.create(
        model="large", prompt="The capital of France is", max_tokens=4, temperature=0
    )
    assert "Paris" in reply.choices[0].text
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 4
    parts = client.completions.create(
        model="large", prompt="The capital of France is", max_tokens=4, temperature=0, stream=True
    )
    assert "".join(p.choices[0].text for p in parts if p.choices) == reply.choices[0].text


def test_models_list_every_tier_and_alias(stack: Stack) -> None:
    names = {m.id for m in stack.openai().models.list()}
    assert names == {"small", "smollm2", "gpt-4o-mini", "large", "gpt-4o", "auto"}


def test_unknown_model_is_a_404_in_openai_shape(stack: Stack) -> None:
    with pytest.raises(NotFoundError) as info:
        stack.openai().chat.completions.create(model="gpt-5", messages=QUESTION)
    error = info.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "small" in error["message"]


def test_tgi_route_picks_the_tier_from_the_header(stack: Stack) -> None:
    reply = httpx.post(
        f"{stack.url}/generate",
        headers={"X-Tier": "large"},
        json={"inputs": "The capital of France is", "parameters": {"max_new_tokens": 3}},
        timeout=60,
    )
    assert reply.status_code == 200 and reply.headers["x-tier"] == "large"
    assert "Paris" in reply.json()["generated_text"]


def test_router_metrics_carry_the_tier(stack: Stack) -> None:
    """Requests made above show up on Ray's metrics port, labelled by tier."""

    def exported() -> bool:
        text = httpx.get(f"http://127.0.0.1:{stack.head.metrics_port}/metrics", timeout=10).text
        return all(
            any(line.startswith(name) and 'tier="large"' in line for line in text.splitlines())
            for name in (
                "ray_serve_app_requests_total",
                "ray_serve_app_time_to_first_token_seconds_bucket",
                "ray_serve_app_completion_tokens_total",
            )
        )

    wait_for(exported, 60, "tier-labelled application metrics on Ray's metrics port")


def test_serve_status_shows_every_deployment_healthy(stack: Stack) -> None:
    """`serve status`, as users run it, with HAProxy as the ingress."""
    out = subprocess.run(
        [str(localstack.BIN / "serve"), "status", "-a", stack.head.dashboard],
        env=stack.env, capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    apps = yaml.safe_load(out)["applications"]
    assert set(apps) == {"llm", "tier-small", "tier-large"}, out
    assert {app["status"] for app in apps.values()} == {"RUNNING"}, out
    deployments = all_deployments(apps)
    assert set(deployments) == {"router", "tier-small", "tier-large"}, out
    assert {d["status"] for d in deployments.values()} == {"HEALTHY"}, out


def test_killed_engine_is_replaced_and_the_tier_answers_again(stack: Stack) -> None:
    (victim,) = tier_engines(stack, "4")  # the small tier's engine
    os.kill(victim, signal.SIGKILL)
    client = stack.openai()

    def answers_again() -> bool:
        replaced = tier_engines(stack, "4") - {victim}
        if not replaced:
            return False
        try:
            reply = client.chat.completions.create(
                model="small", messages=QUESTION, max_tokens=8, temperature=0, timeout=30
            )
        except Exception:
            return False
        return "Paris" in (reply.choices[0].message.content or "")

    wait_for(answers_again, 120, "a new small-tier engine that answers")


def test_serve_shutdown_leaves_no_engine(stack: Stack) -> None:
    assert stack.engines()
    localstack.shutdown(stack.head, stack.env)
    wait_for(lambda: not stack.engines(), 60, "every engine process to exit")
