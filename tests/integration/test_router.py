"""The router with real clients: tier policies, limits, disconnects, bad input."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from huggingface_hub import InferenceClient
from openai import AsyncOpenAI

from devstack.hosts import engine_url
from tests.helpers import wait_for

from .conftest import Stack, local_config

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
LONG_STORY = [{"role": "user", "content": "Tell me a long story about a lighthouse."}]


@pytest.fixture(scope="module")
def stack(ray_head: Stack) -> Stack:
    config = local_config()
    small = config["applications"][0]["args"]["tiers"][0]
    small.setdefault("tuning", {})["overflow_at_in_flight"] = 2
    ray_head.deploy(config)
    return ray_head


def chat(stack: Stack, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(f"{stack.url}/v1/chat/completions", json=body, headers=headers, timeout=120)


@pytest.mark.parametrize(
    ("extra", "headers", "tier", "reason"),
    [
        ({}, {}, "small", "auto default"),
        ({}, {"x-quality": "high"}, "large", "auto rule 0"),
        ({"max_tokens": 450}, {}, "large", "auto rule 2"),
    ],
)
def test_auto_picks_the_tier_by_rules(
    stack: Stack, extra: dict[str, Any], headers: dict[str, str], tier: str, reason: str
) -> None:
    body = {"model": "auto", "messages": QUESTION, "max_tokens": 4, **extra}
    reply = chat(stack, body, **headers)
    assert reply.status_code == 200, reply.text
    assert (reply.headers["x-tier"], reply.headers["x-tier-reason"]) == (tier, reason)
    assert reply.json()["model"] == "auto"


def test_alias_routing_says_why(stack: Stack) -> None:
    reply = chat(stack, {"model": "gpt-4o", "messages": QUESTION, "max_tokens": 4})
    assert (reply.headers["x-tier"], reply.headers["x-tier-reason"]) == ("large", "alias gpt-4o")


def test_spill_over_while_the_tier_is_saturated_and_back(stack: Stack) -> None:
    body = {"model": "small", "messages": LONG_STORY, "max_tokens": 300, "stream": True}
    opened = threading.Barrier(3)

    def hold() -> None:
        with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json=body,
                          timeout=180) as reply:  # fmt: skip
            lines = reply.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            opened.wait(60)
            for _ in lines:
                pass

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for t in holders:
        t.start()
    opened.wait(60)  # two small-tier streams in flight: the tier is saturated
    spilled = chat(stack, {"model": "small", "messages": QUESTION, "max_tokens": 4})
    assert spilled.status_code == 200
    assert spilled.headers["x-tier"] == "large"
    assert spilled.headers["x-tier-reason"] == "spill-over from small (model)"
    for t in holders:
        t.join(180)
    back = chat(stack, {"model": "small", "messages": QUESTION, "max_tokens": 4})
    assert back.headers["x-tier"] == "small"


def test_limits_are_enforced_with_clear_messages(stack: Stack) -> None:
    too_many = chat(stack, {"model": "small", "messages": QUESTION, "max_tokens": 100_000})
    assert too_many.status_code == 400
    error = too_many.json()["error"]
    assert error["param"] == "max_tokens" and "limit of 512" in error["message"]
    long_prompt = [{"role": "user", "content": "word " * 1700}]
    too_long = chat(stack, {"model": "small", "messages": long_prompt, "max_tokens": 4})
    assert too_long.status_code == 400
    assert "must have less than 1536 tokens" in too_long.json()["error"]["message"]
    big = httpx.post(f"{stack.url}/v1/chat/completions", content=b"x" * 2_100_000,
                     headers={"content-type": "application/json"}, timeout=60)  # fmt: skip
    assert big.status_code == 413


def engine_metric(stack: Stack, batch: str, name: str) -> float:
    for argv in stack.engines().values():
        if argv[argv.index("--max-batch-size") + 1] == batch:
            text = httpx.get(f"{engine_url(argv)}/metrics", timeout=5).text
            return float(re.search(rf"^{name} (\S+)$", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
    raise AssertionError(f"no engine with --max-batch-size {batch}")


def test_client_disconnect_frees_the_engine_slot(stack: Stack) -> None:
    body = {"model": "large", "messages": LONG_STORY, "max_tokens": 1000, "stream": True}
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json=body,
                      timeout=60) as reply:  # fmt: skip
        lines = reply.iter_lines()
        next(line for line in lines if line.startswith("data:"))
        assert engine_metric(stack, "2", "tgi_batch_current_size") == 1
    started = time.monotonic()
    wait_for(lambda: engine_metric(stack, "2", "tgi_batch_current_size") == 0, 10,
             "the engine slot to be freed")  # fmt: skip
    assert time.monotonic() - started < 10


def test_huggingface_clients_through_the_router(stack: Stack) -> None:
    chat_client = InferenceClient(base_url=f"{stack.url}/v1")
    reply = chat_client.chat_completion(
        messages=QUESTION, model="small", max_tokens=16, temperature=0
    )
    assert "Paris" in reply.choices[0].message.content
    tgi = InferenceClient(base_url=stack.url, headers={"X-Tier": "large"})
    assert "Paris" in tgi.text_generation("The capital of France is", max_new_tokens=3)
    tokens = list(tgi.text_generation("The capital of France is", max_new_tokens=3, stream=True))
    assert "Paris" in "".join(tokens)


def test_async_openai_sdk_concurrently(stack: Stack) -> None:
    async def run() -> list[str]:
        client = AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
        replies = await asyncio.gather(
            *(client.chat.completions.create(model=m, messages=QUESTION, max_tokens=8,
                                             temperature=0) for m in ("small", "large") * 2)
        )  # fmt: skip
        stream = await client.chat.completions.create(
            model="small", messages=QUESTION, max_tokens=8, temperature=0, stream=True
        )
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.close()
        return [r.choices[0].message.content or "" for r in replies] + [streamed]

    assert all("Paris" in text for text in asyncio.run(run()))


BAD: list[tuple[str, str, Any, int]] = [
    # (method, path, JSON body or raw text, status)
    ("POST", "/v1/chat/completions", "{not json", 400),
    ("POST", "/v1/chat/completions", "[1, 2]", 400),
    ("POST", "/v1/chat/completions", {}, 400),
    ("POST", "/v1/chat/completions", {"model": 7, "messages": QUESTION}, 400),
    ("POST", "/v1/chat/completions", {"model": "gpt-5", "messages": QUESTION}, 404),
    ("POST", "/v1/chat/completions", {"model": "small"}, 400),
    ("POST", "/v1/chat/completions", {"model": "small", "messages": []}, 400),
    ("POST", "/v1/chat/completions", {"model": "small", "messages": "hi"}, 400),
    ("POST", "/v1/chat/completions", {"model": "small", "messages": [{"content": "x"}]}, 400),
    ("POST", "/v1/chat/completions", {"model": "small", "messages": QUESTION, "n": 2}, 400),
    ("POST", "/v1/chat/completions", {"model": "small", "messages": QUESTION, "max_tokens": 0}, 400),
    ("POST", "/v1/chat/completions", {"model": "small", "messages": QUESTION, "max_tokens": -3}, 400),
    ("POST", "/v1/chat/completions", {"model": "small", "messages": QUESTION, "max_tokens": "ten"}, 400),
    ("POST", "/v1/chat/completions", {"model": "small", "messages": QUESTION, "stream": "yes"}, 400),
    ("POST", "/v1/chat/completions", {"model": "small", "messages": QUESTION, "temperature": -1}, 400),
    ("POST", "/v1/chat/completions", {"model": "small", "messages": QUESTION, "top_p": 7}, 400),
    ("POST", "/v1/chat/completions", {"model": "small", "messages": QUESTION, "stop": ["a"] * 9}, 400),
    ("POST", "/v1/chat/completions", {"model": "small", "messages": QUESTION, "stream_options": 3}, 400),
    ("POST", "/v1/chat/completions", {"model": "small", "messages": QUESTION,
                                      "response_format": {"type": "xml"}}, 400),
    ("POST", "/v1/chat/completions", {"model": "small", "messages": QUESTION, "stream": True,
                                      "temperature": -1}, 400),
    ("POST", "/v1/completions", {"model": "small"}, 400),
    ("POST", "/v1/completions", {"model": "small", "prompt": ""}, 400),
    ("POST", "/v1/completions", {"model": "small", "prompt": ["a", "b"]}, 400),
    ("POST", "/v1/completions", {"model": "small", "prompt": 12}, 400),
    ("POST", "/v1/completions", {"model": "nope", "prompt": "hi"}, 404),
    ("GET", "/v1/models/nope", None, 404),
    ("GET", "/v1/chat/completions", None, 405),
    ("POST", "/generate", {"inputs": "hi", "parameters": {"temperature": 0}}, 422),
    ("POST", "/generate", {"inputs": "hi"}, 200),
    ("POST", "/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 1}}, 200),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "body", "status"), BAD,
                         ids=[f"{i}-{b[1]}-{b[3]}" for i, b in enumerate(BAD)])  # fmt: skip
def test_bad_requests_get_clear_errors_and_no_5xx(
    stack: Stack, method: str, path: str, body: Any, status: int
) -> None:
    if isinstance(body, str):
        reply = httpx.request(method, f"{stack.url}{path}", content=body.encode(),
                              headers={"content-type": "application/json"}, timeout=60)  # fmt: skip
    else:
        reply = httpx.request(method, f"{stack.url}{path}", json=body, timeout=60)
    assert reply.status_code == status, reply.text
    if status >= 400 and path.startswith("/v1") and status != 405:
        error = reply.json()["error"]
        assert {"message", "type", "param", "code"} <= set(error)
        assert error["message"]
    if status == 422:
        assert set(reply.json()) == {"error", "error_type"}  # TGI routes keep TGI's shape
    assert httpx.get(f"{stack.url}/health", timeout=10).status_code == 200


def _shape(value: Any, spec: Any, where: str = "") -> None:
    """`value` has every field of `spec` with its type (a dict spec: an object; a 1-list spec:
    an array of that; a tuple: one of those types)."""
    if isinstance(spec, dict):
        assert isinstance(value, dict), where
        for key, sub in spec.items():
            assert key in value, f"{where}.{key} missing"
            _shape(value[key], sub, f"{where}.{key}")
    elif isinstance(spec, list):
        assert isinstance(value, list), where
        for i, item in enumerate(value):
            _shape(item, spec[0], f"{where}[{i}]")
    else:
        assert isinstance(value, spec), f"{where}: {value!r} is not {spec}"


USAGE = {"prompt_tokens": int, "completion_tokens": int, "total_tokens": int}
FINISH = (str, type(None))
CHAT = {"id": str, "object": str, "created": int, "model": str, "usage": USAGE,
        "choices": [{"index": int, "finish_reason": str,
                     "message": {"role": str, "content": str}}]}  # fmt: skip
CHAT_CHUNK = {"id": str, "object": str, "created": int, "model": str,
              "choices": [{"index": int, "finish_reason": FINISH, "delta": dict}]}  # fmt: skip
COMPLETION = {"id": str, "object": str, "created": int, "model": str, "usage": USAGE,
              "choices": [{"index": int, "text": str, "finish_reason": str}]}  # fmt: skip
COMPLETION_CHUNK = {"id": str, "object": str, "created": int, "model": str,
                    "choices": [{"index": int, "text": str, "finish_reason": FINISH}]}  # fmt: skip


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_answers_have_openais_shape(stack: Stack, kind: str) -> None:
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    body: dict[str, Any] = {"model": "gpt-4o-mini", "max_tokens": 6}
    body.update({"messages": QUESTION} if kind == "chat" else {"prompt": "The capital of"})
    whole = httpx.post(f"{stack.url}{path}", json=body, timeout=60).json()
    _shape(whole, CHAT if kind == "chat" else COMPLETION)
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    assert whole["id"].startswith(prefix) and whole["model"] == "gpt-4o-mini"
    assert whole["object"] == ("chat.completion" if kind == "chat" else "text_completion")
    assert whole["choices"][0]["finish_reason"] in ("stop", "length")
    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{stack.url}{path}", json=stream_body, timeout=60) as reply:
        lines = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    if kind == "chat":  # usage as its own last chunk (TGI's completion stream carries none)
        usage = chunks.pop()
        assert usage["choices"] == [] and set(usage["usage"]) >= set(USAGE)
    for chunk in chunks:
        _shape(chunk, CHAT_CHUNK if kind == "chat" else COMPLETION_CHUNK)
        assert chunk["id"] == chunks[0]["id"]
        assert chunk["object"] == ("chat.completion.chunk" if kind == "chat" else "text_completion")
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_haproxy_is_the_ingress(stack: Stack) -> None:
    """The stack's port is HAProxy's, forwarding to the router replicas' own HTTP servers."""
    configs = list(Path(stack.head.temp_dir, "haproxy").rglob("haproxy.cfg"))
    assert configs, "no HAProxy config under the head's temp dir"
    text = configs[0].read_text()
    assert re.search(rf"bind \S+:{stack.http_port}\b", text), text
    assert re.search(r"server SERVE_REPLICA_llm-router\S* [\d.]+:\d+", text), text


@pytest.mark.parametrize("stream", [False, True])
def test_request_ids_are_echoed_or_assigned(stack: Stack, stream: bool) -> None:
    body = {"model": "small", "messages": QUESTION, "max_tokens": 2, "stream": stream}
    mine = chat(stack, body, **{"x-request-id": "my-trace-42"})
    assert mine.status_code == 200 and mine.headers["x-request-id"] == "my-trace-42"
    ids = {chat(stack, body).headers.get("x-request-id") for _ in range(2)}
    assert None not in ids and len(ids) == 2, ids
    refused = chat(stack, {**body, "model": "nope"}, **{"x-request-id": "bad-one"})
    assert refused.status_code == 404 and refused.headers["x-request-id"] == "bad-one"


def test_a_stream_cut_by_the_client_leaves_the_next_ones_whole(stack: Stack) -> None:
    """Ten streams cut after their first token, then ten read to the end: every one of those
    ends in [DONE] and the engine's batch is empty again."""
    body = {"model": "large", "messages": LONG_STORY, "max_tokens": 200, "stream": True}

    async def scenario() -> list[str]:
        async with httpx.AsyncClient(base_url=stack.url, timeout=120) as client:

            async def cut() -> None:
                async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
                    async for line in reply.aiter_lines():
                        if line.startswith("data:"):
                            return

            async def whole() -> str:
                short = {**body, "max_tokens": 4}
                async with client.stream("POST", "/v1/chat/completions", json=short) as reply:
                    return [line async for line in reply.aiter_lines() if line][-1]

            await asyncio.gather(*(cut() for _ in range(10)))
            return list(await asyncio.gather(*(whole() for _ in range(10))))

    assert asyncio.run(scenario()) == ["data: [DONE]"] * 10
    wait_for(lambda: engine_metric(stack, "2", "tgi_batch_current_size") == 0, 15,
             "the cut streams' slots to be freed")  # fmt: skip
