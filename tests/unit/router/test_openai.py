"""OpenAI request checks and answer normalisation (pure functions)."""

from __future__ import annotations

import json

import httpx
import pytest
from openai import OpenAI

from serve_app.config import TierConfig
from serve_app.errors import InvalidRequest
from serve_app.router.openai import SSE_DONE, Normaliser
from serve_app.router.requests import Kind, OpenAIRequest, parse_openai

TIER = TierConfig(name="small", default_max_tokens=64, max_tokens_limit=256)


def parse(kind: Kind, body: dict[str, object], model: str) -> OpenAIRequest:
    """`body` as the client named `model`."""
    return parse_openai(kind, {**body, "model": model})


def chat(**fields: object) -> dict[str, object]:
    return {"model": "small", "messages": [{"role": "user", "content": "hi"}], **fields}


def test_defaults_and_engine_payload() -> None:
    parsed = parse("chat", chat(), "small")
    assert parsed.call(TIER).payload["max_tokens"] == 64
    assert parsed.call(TIER).payload["model"] == TIER.engine.model_id
    assert not parsed.stream


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": 1000}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"n": 3}, "n"),
        ({"stream": "yes"}, "stream"),
        ({"messages": []}, "messages"),
        ({"messages": [{"content": "no role"}]}, "messages[0]"),
        ({"stream_options": 5}, "stream_options"),
    ],
)
def test_bad_requests_name_the_parameter(fields: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse("chat", chat(**fields), "small").call(TIER)
    assert info.value.param == param


def test_tgi_quirks_are_normalised() -> None:
    parsed = parse("chat", chat(stream=True), "gpt-4o-mini")
    norm = Normaliser(parsed)
    events = norm.chunk(
        {
            "id": "",
            "model": "smollm2-135m-instruct",
            "system_fingerprint": "3.3.7-native",
            "choices": [{"index": 0, "delta": {"content": "."}, "finish_reason": "stop_sequence"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        }
    )
    assert len(events) == 1  # usage not asked for: not shown
    chunk = json.loads(events[0].removeprefix(b"data: "))
    assert chunk["id"].startswith("chatcmpl-") and chunk["model"] == "gpt-4o-mini"
    assert chunk["object"] == "chat.completion.chunk"
    assert chunk["choices"][0]["finish_reason"] == "stop"
    assert norm.usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_usage_gets_its_own_chunk_when_asked() -> None:
    body = chat(stream=True, stream_options={"include_usage": True})
    norm = Normaliser(parse("chat", body, "small"))
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    events = norm.chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
                         "usage": usage})  # fmt: skip
    last = json.loads(events[-1].removeprefix(b"data: "))
    assert last["choices"] == [] and last["usage"] == usage


# (field values, the `param` the 400 names, or None when accepted)
BOUND_CASES: list[tuple[dict[str, object], str | None]] = [
    ({"temperature": 0}, None),
    ({"temperature": 2}, None),
    ({"temperature": 2.01}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 1}, None),
    ({"top_p": 0.5}, None),
    ({"top_p": 0}, "top_p"),  # TGI refuses 0
    ({"top_p": 1.5}, "top_p"),
    ({"presence_penalty": 2}, None),
    ({"presence_penalty": -2}, "presence_penalty"),  # TGI: repetition_penalty 0
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -2}, None),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"frequency_penalty": True}, "frequency_penalty"),
    ({"logprobs": True, "top_logprobs": 20}, None),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 1.5}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),  # needs logprobs
    ({"logprobs": "yes"}, "logprobs"),
    ({"seed": 0}, None),
    ({"seed": -1}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"seed": 10**400}, "seed"),  # past any float: still a 400
    ({"seed": 7.0}, None),
    ({"stop": "\n"}, None),
    ({"stop": ["a", "b", "c", "d"]}, None),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"logit_bias": {}}, None),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"n": None}, None),
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, None),
    ({"tools": {"f": 1}}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
]


@pytest.mark.parametrize(("fields", "param"), BOUND_CASES)
def test_openai_bounds_name_the_field(fields: dict[str, object], param: str | None) -> None:
    if param is None:
        parse("chat", chat(**fields), "small").call(TIER)
        return
    with pytest.raises(InvalidRequest) as info:
        parse("chat", chat(**fields), "small").call(TIER)
    assert info.value.param == param
    assert f"`{param.split('[')[0]}" in info.value.message


@pytest.mark.parametrize(
    ("fields", "sent"),
    [
        ({"top_p": 1}, {}),  # OpenAI's "no cut"; TGI refuses 1.0
        ({"presence_penalty": 0}, {}),  # TGI would read 0 as repetition_penalty 2
        ({"frequency_penalty": 0}, {}),
        ({"top_p": 0.9, "presence_penalty": 0.5}, {"top_p": 0.9, "presence_penalty": 0.5}),
        ({"stop": "\n"}, {"stop": ["\n"]}),  # TGI takes only a list
        ({"logit_bias": {}}, {}),  # TGI's field is a list
    ],
)
def test_payload_in_tgis_terms(fields: dict[str, object], sent: dict[str, object]) -> None:
    payload = parse("chat", chat(**fields), "small").call(TIER).payload
    assert {k: payload[k] for k in fields if k in payload} == sent


def test_completion_logprobs_are_not_chats() -> None:
    body = {"model": "small", "prompt": "hi", "logprobs": 2}
    assert parse("completion", body, "small").call(TIER).payload["logprobs"] == 2


def tgi_tool_chunk(arguments: str, name: str | None = None, finish: str | None = None) -> dict:
    call = {"index": 0, "id": "0", "type": "function",
            "function": {"name": name, "arguments": arguments}}  # fmt: skip
    delta = {"role": "assistant", "tool_calls": [call]}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def deltas(events: list[bytes]) -> list[dict]:
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events]
    return [c["choices"][0] for c in chunks if c["choices"]]


def test_streamed_tool_calls_take_openais_shape() -> None:
    norm = Normaliser(parse("chat", chat(stream=True), "small"))
    first = deltas(norm.chunk(tgi_tool_chunk("{", name="get_weather")))[0]
    assert first["delta"] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"index": 0, "id": "0", "type": "function",
                        "function": {"name": "get_weather", "arguments": "{"}}],
    }  # fmt: skip
    later = deltas(norm.chunk(tgi_tool_chunk('"city": "Paris"')))[0]
    assert later["delta"] == {
        "tool_calls": [{"index": 0, "function": {"arguments": '"city": "Paris"'}}]
    }
    last = deltas(norm.chunk(tgi_tool_chunk("}", finish="stop")))[0]
    assert last["finish_reason"] == "tool_calls"


def test_a_tool_stream_tgi_leaves_unfinished_is_finished() -> None:
    body = chat(stream=True, stream_options={"include_usage": True})
    norm = Normaliser(parse("chat", body, "small"))
    norm.chunk(tgi_tool_chunk("{", name="now"))
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    events = norm.chunk({"choices": [], "usage": usage})  # TGI's usage chunk, nothing else
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events]
    assert next(c["choices"] for c in chunks) == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
    ]
    assert chunks[-1]["usage"] == usage and chunks[-1]["choices"] == []


def test_content_streams_name_the_role_once() -> None:
    norm = Normaliser(parse("chat", chat(stream=True), "small"))
    tgi = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": t},
                         "finish_reason": None}]} for t in ("Pa", "ris")]  # fmt: skip
    got = [deltas(norm.chunk(c))[0]["delta"] for c in tgi]
    assert got == [{"role": "assistant", "content": "Pa"}, {"content": "ris"}]


def test_a_whole_tool_call_answer_takes_openais_shape() -> None:
    norm = Normaliser(parse("chat", chat(), "small"))
    call = {"id": "0", "type": "function",
            "function": {"description": None, "name": "now", "arguments": {}}}  # fmt: skip
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "tool_calls": [call]},
                         "finish_reason": "stop"}]}  # fmt: skip
    choice = norm.complete(body)["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"]["arguments"] == "{}"


def test_the_openai_sdk_joins_the_normalised_tool_stream() -> None:
    """The SDK's own stream accumulator over the router's events for TGI's fragments."""
    norm = Normaliser(parse("chat", chat(stream=True), "small"))
    pieces = [("{", "get_weather"), (' "city": "Paris"', None), ("}", None)]
    tgi = [tgi_tool_chunk(args, name=name) for args, name in pieces]
    tgi[-1]["choices"][0]["finish_reason"] = "stop"
    tgi[-1]["usage"] = {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    body = b"".join(e for c in tgi for e in norm.chunk(c)) + SSE_DONE

    def reply(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    client = OpenAI(base_url="http://router/v1", api_key="unused",
                    http_client=httpx.Client(transport=httpx.MockTransport(reply)))  # fmt: skip
    with client.chat.completions.stream(model="small", messages=[]) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.role == "assistant"
    (call,) = choice.message.tool_calls
    assert (call.id, call.type, call.function.name) == ("0", "function", "get_weather")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
