"""The whole path: `serve deploy` of the shipped config, then real clients over HTTP.

One Ray head for the module; the last test shuts the application down and checks that no engine
process is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from openai import NotFoundError

from devstack import localstack
from serve_app.compare.report import markdown as report_table
from tests.helpers import all_deployments, wait_for

from .conftest import Stack, local_config

# engines' output and usage lines in a pod log, as on KubeRay (tests/integration/conftest.py)
POD_LOG = True
EVAL = Path(__file__).resolve().parents[2] / "bench" / "eval" / "basics.jsonl"
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


def test_compare_two_tiers_on_an_eval_set(stack: Stack, tmp_path: Path) -> None:
    """`python -m serve_app.compare` through the stack: both tiers answer every case, and the
    result has the figures and the table a team reads."""
    cases = [line for line in EVAL.read_text().splitlines() if line][:6]
    eval_file = tmp_path / "six.jsonl"
    eval_file.write_text("\n".join(cases) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "serve_app.compare", "--eval", str(eval_file),
         "--targets", "small,large", "--url", stack.url, "--concurrency", "3",
         "--max-tokens", "12", "--out", str(tmp_path), "--name", "run"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "run.json").read_text())
    assert [t["target"] for t in result["targets"]] == ["small", "large"]
    for figures in result["targets"]:
        assert figures["requests"] == 6 and figures["errors"] == 0, figures["error_examples"]
        assert figures["completion_tokens"] > 0 and figures["prompt_tokens"] > 0
        assert figures["ttft_ms"]["p50"] > 0 and figures["graded"] == 6
        assert figures["contains_expected"] > 0  # "Paris" at least
    assert result["agreement"]["compared"] == 6
    assert (tmp_path / "run.md").read_text() == report_table(result)
    assert "| exact match |" in done.stdout


def test_the_pod_log_shows_engine_start_up_and_usage_lines(stack: Stack) -> None:
    """What `kubectl logs` of a pod shows (SERVE_APP_POD_LOG, /proc/1/fd/1 on KubeRay): each
    engine's start-up output and its supervisor's messages prefixed with tier and replica, and a
    usage line per request."""
    reply = httpx.post(f"{stack.url}/v1/chat/completions", timeout=60,
                       headers={"x-request-id": "pod-log-usage"},
                       json={"model": "small", "messages": QUESTION, "max_tokens": 2})  # fmt: skip
    assert reply.status_code == 200
    log = stack.workdir / "pod.log"
    wait_for(lambda: "pod-log-usage" in log.read_text(), 30, "the usage line in the pod log")
    lines = log.read_text().splitlines()
    for tier in ("small", "large"):
        mine = [line for line in lines if line.startswith(f"[tier={tier} replica=")]
        assert any("starting engine:" in line for line in mine), mine[:5]
        assert any("Connected: serving on" in line for line in mine), mine[:10]
    (usage,) = [json.loads(line) for line in lines if '"pod-log-usage"' in line]
    assert usage["tier"] == "small" and usage["status"] == 200 and usage["completion_tokens"] > 0


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
    assert set(deployments) == {"router", "version-board", "tier-small", "tier-large"}, out
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
