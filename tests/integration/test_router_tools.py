"""Tool calling through the router, as agents use it: the openai SDK's whole flow (tools →
tool_calls → the tool's result → an answer), streamed and not, on every tier; and
huggingface_hub's client. The answers are checked against TGI's OpenAPI schemas."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from huggingface_hub import InferenceClient

from tests.openapi import response_validator
from tests.tools import ASK_WEATHER, WEATHER_TOOL

from .conftest import Stack, local_config

WEATHER, ASK = WEATHER_TOOL, ASK_WEATHER
TIERS = ["small", "large"]


@pytest.fixture(scope="module")
def stack(ray_head: Stack) -> Stack:
    ray_head.deploy(local_config())
    return ray_head


def answer_with_tool_result(stack: Stack, tier: str, call_id: str, assistant: Any) -> Any:
    result = {"role": "tool", "tool_call_id": call_id, "content": "22 degrees and sunny"}
    messages = [*ASK, assistant, result]
    final = stack.openai().chat.completions.create(
        model=tier, messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=16,
        temperature=0,
    )  # fmt: skip
    assert final.choices[0].message.content
    assert not final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason in ("stop", "length")
    return final


@pytest.mark.parametrize("tier", TIERS)
def test_openai_tool_flow(stack: Stack, tier: str) -> None:
    reply = stack.openai().chat.completions.with_raw_response.create(
        model=tier, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=60,
        temperature=0,
    )  # fmt: skip
    assert reply.headers["x-tier"] == tier
    body = json.loads(reply.text)
    response_validator("/v1/chat/completions", "post", "application/json").validate(body)
    completion = reply.parse()
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id and call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city", "unit"}
    answer_with_tool_result(stack, tier, call.id, choice.message.model_dump(exclude_none=True))


@pytest.mark.parametrize("tier", TIERS)
def test_openai_tool_flow_streamed(stack: Stack, tier: str) -> None:
    stream = stack.openai().chat.completions.create(
        model=tier, messages=ASK, tools=[WEATHER], tool_choice={"type": "function",
        "function": {"name": "get_weather"}}, max_tokens=60, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    fragments, finish, usage = [], None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            fragments += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and usage is not None and usage.completion_tokens > 0
    first, rest = fragments[0], fragments[1:]
    assert first.id and first.type == "function" and first.function.name == "get_weather"
    assert all(f.index == 0 and f.id is None and f.function.name is None for f in rest)
    arguments = "".join(f.function.arguments or "" for f in fragments)
    assert set(json.loads(arguments)) == {"city", "unit"}
    assistant = {"role": "assistant", "content": None, "tool_calls": [
        {"id": first.id, "type": "function",
         "function": {"name": "get_weather", "arguments": arguments}}]}  # fmt: skip
    answer_with_tool_result(stack, tier, first.id, assistant)


def test_openai_sdk_stream_helper_accumulates_the_call(stack: Stack) -> None:
    with stack.openai().chat.completions.stream(
        model="small", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=60,
        temperature=0,
    ) as stream:  # fmt: skip
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert final.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city", "unit"}


def test_inference_client_tools_through_the_router(stack: Stack) -> None:
    client = InferenceClient(base_url=stack.url)
    reply = client.chat_completion(
        model="small", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=60,
        temperature=0,
    )  # fmt: skip
    assert reply.choices[0].finish_reason == "tool_calls"
    assert reply.choices[0].message.tool_calls[0].function.name == "get_weather"
    chunks = list(client.chat_completion(
        model="large", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=60,
        temperature=0, stream=True,
    ))  # fmt: skip
    calls = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert calls[0].function.name == "get_weather"
    assert json.loads("".join(t.function.arguments for t in calls))["city"] in WEATHER[
        "function"]["parameters"]["properties"]["city"]["enum"]  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "status", "param"),
    [
        ({"temperature": 3}, 400, "temperature"),
        ({"top_p": 0}, 400, "top_p"),
        ({"presence_penalty": -2.5}, 400, "presence_penalty"),
        ({"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
        ({"tools": [{"type": "retrieval"}]}, 400, "tools[0]"),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, 400, None),
    ],
)
def test_bad_tool_and_sampling_fields_are_400s(
    stack: Stack, fields: dict[str, Any], status: int, param: str | None
) -> None:
    body = {"model": "small", "messages": ASK, "max_tokens": 8, **fields}
    reply = httpx.post(f"{stack.url}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["message"]
