"""OpenAI request checks and answer normalisation (pure functions)."""

from __future__ import annotations

import json

import pytest

from serve_app.config import TierConfig
from serve_app.errors import InvalidRequest
from serve_app.router.openai import Normaliser, parse_request

TIER = TierConfig(name="small", default_max_tokens=64, max_tokens_limit=256)


def chat(**fields: object) -> dict[str, object]:
    return {"model": "small", "messages": [{"role": "user", "content": "hi"}], **fields}


def test_defaults_and_engine_payload() -> None:
    parsed = parse_request("chat", chat(), "small", TIER)
    assert parsed.payload["max_tokens"] == 64
    assert parsed.payload["model"] == TIER.engine.model_id
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
        parse_request("chat", chat(**fields), "small", TIER)
    assert info.value.param == param


def test_tgi_quirks_are_normalised() -> None:
    parsed = parse_request("chat", chat(stream=True), "gpt-4o-mini", TIER)
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
    norm = Normaliser(parse_request("chat", body, "small", TIER))
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    events = norm.chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
                         "usage": usage})  # fmt: skip
    last = json.loads(events[-1].removeprefix(b"data: "))
    assert last["choices"] == [] and last["usage"] == usage
