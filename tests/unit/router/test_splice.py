"""The spliced path for plain OpenAI chunks (`serve_app.router.splice`): byte for byte what the
full parse-and-encode path sends, over the shapes engines send, and the full path for the rest."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest

from serve_app.router.openai import Normaliser
from serve_app.router.requests import parse_openai
from serve_app.router.splice import canonical
from serve_app.router.sse import Tally, openai_events

COMPACT = (",", ":")


def request(kind: str, include_usage: bool = False) -> Any:
    body: dict[str, Any] = {"model": "small-ü", "stream": True}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "hi"
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    return parse_openai(kind, body)  # type: ignore[arg-type]


def local_chat(text: str, role: bool = True, finish: str | None = None, fp: Any = "3.0.1-native",
               usage: Any = None) -> str:  # fmt: skip
    """The project's local engine's order: its header, then `object`, `choices`, `usage`."""
    delta = {"role": "assistant", "content": text} if role else {"content": text}
    return json.dumps({"id": "", "created": 7, "model": "simulated", "system_fingerprint": fp,
                       "object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                    "finish_reason": finish}], "usage": usage},
                      separators=COMPACT)  # fmt: skip


def tgi_chat(text: str, ensure_ascii: bool = False) -> str:
    """TGI's order, its non-ASCII text written as it is."""
    return json.dumps({"object": "chat.completion.chunk", "id": "", "created": 7, "model": "m",
                       "system_fingerprint": "3.3.7",
                       "choices": [{"index": 0, "delta": {"role": "assistant", "content": text},
                                    "logprobs": None, "finish_reason": None}], "usage": None},
                      separators=COMPACT, ensure_ascii=ensure_ascii)  # fmt: skip


def local_text(text: str, finish: str = "") -> str:
    return json.dumps({"id": "", "created": 7, "model": "simulated", "system_fingerprint": "x",
                       "object": "text_completion",
                       "choices": [{"index": 0, "text": text, "logprobs": None,
                                    "finish_reason": finish}]}, separators=COMPACT)  # fmt: skip


TEXTS = ["Hello", " world", "", 'say "hi"', "back\\slash", "line\nbreak", "tab\t", "é", "日本",
         "emoji 😀", "\x7f", "</s>", "{[braces]}", "a,b:c", "\u2028"]  # fmt: skip


class Calls:
    def __init__(self, batches: list[list[str]]) -> None:
        self._items = iter(batches)

    async def __anext__(self) -> list[str] | None:
        return next(self._items, None)

    def cancel(self) -> None:
        pass


def stream(kind: str, events: list[str], spliced: bool, include_usage: bool = False
           ) -> tuple[bytes, Tally]:  # fmt: skip
    normaliser = Normaliser(request(kind, include_usage))
    if not spliced:
        normaliser.event = lambda data: None  # type: ignore[method-assign]
    tally = Tally()
    batches = [[e] for e in events] + [["[DONE]"]]

    async def run() -> bytes:
        return b"".join([w async for w in openai_events(normaliser, tally, batches[0],
                                                         Calls(batches[1:]))])  # fmt: skip

    body = asyncio.run(run())
    body = re.sub(rb'"id":"c[a-z]*mpl-[0-9a-f]+"', b'"id":"ID"', body)
    return re.sub(rb'"created":\d+', b'"created":0', body), tally


def same_both_ways(kind: str, events: list[str], include_usage: bool = False) -> bytes:
    fast, fast_tally = stream(kind, events, True, include_usage)
    full, full_tally = stream(kind, events, False, include_usage)
    assert fast == full
    assert (fast_tally.tokens, fast_tally.usage, fast_tally.status) == (
        full_tally.tokens, full_tally.usage, full_tally.status)  # fmt: skip
    return fast


@pytest.mark.parametrize("text", TEXTS)
def test_chat_chunks_as_the_full_path_sends_them(text: str) -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    events = [local_chat(text), local_chat(text), tgi_chat(text), tgi_chat(text, True),
              local_chat(text, role=False), local_chat(text, fp=None),
              local_chat(text, finish="length", usage=usage)]  # fmt: skip
    for include_usage in (False, True):
        same_both_ways("chat", events, include_usage)


@pytest.mark.parametrize("text", TEXTS)
def test_completion_chunks_as_the_full_path_sends_them(text: str) -> None:
    same_both_ways("completion", [local_text(text), local_text(text), local_text(text, "length")])


def test_a_stream_that_starts_without_role_keeps_the_later_role_out() -> None:
    body = same_both_ways("chat", [local_chat("a", role=False), local_chat("b")])
    assert body.count(b'"role"') == 0


def test_only_the_first_delta_keeps_its_role() -> None:
    body = same_both_ways("chat", [local_chat("a"), local_chat("b"), local_chat("c")])
    assert body.count(b'"role":"assistant"') == 1


def test_plain_chunks_take_the_spliced_path_and_others_the_full_one() -> None:
    normaliser = Normaliser(request("chat"))
    assert normaliser.event(local_chat("x")) is not None
    assert normaliser.event(tgi_chat("é")) is not None
    others = [
        local_chat("x", finish="stop"),
        local_chat("x", usage={"prompt_tokens": 1}),
        json.dumps(json.loads(local_chat("x"))),  # spaces after separators
        local_chat("x").replace('"logprobs":null', '"logprobs":{"content":[]}'),
        local_chat("x").replace('"index":0', '"index":1'),
        local_chat("x").replace('"usage":null', '"error":"boom"'),
        local_chat("x").replace('"usage":null', '"extra":1'),
        local_chat("x").replace('"content":"x"', '"content":"bad \\q escape"'),
        local_chat("x").replace('"content":"x"', '"content":"raw \x01 control"'),
        local_chat("x").replace('"usage":null}', '"usage":null,}'),
        local_chat("x")[:-1],
    ]
    for data in others:
        assert normaliser.event(data) is None, data


def test_tokens_counted_per_chunk_that_carries_text() -> None:
    _, tally = stream("chat", [local_chat("a"), local_chat(""), local_chat("b")], True)
    assert tally.tokens == 2


def test_canonical_strings_are_those_the_encoder_writes() -> None:
    for text in TEXTS:
        for raw in (json.dumps(text), json.dumps(text, ensure_ascii=False)):
            assert canonical(raw) == json.dumps(text)
