"""The router's streamed answers (`serve_app.router.sse`) over batches of engine events: one
write per batch, errors and the end of the stream wherever they fall in a batch."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from serve_app.engine.sse import Batch
from serve_app.errors import EngineUnavailable
from serve_app.router.accounting import Usage
from serve_app.router.openai import Normaliser
from serve_app.router.requests import parse_openai
from serve_app.router.sse import DONE, Tally, openai_events, tgi_events

CHAT = {"model": "small", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def token(text: str, finish: str | None = None) -> str:
    choice = {"index": 0, "delta": {"role": "assistant", "content": text}, "logprobs": None,
              "finish_reason": finish}  # fmt: skip
    return json.dumps({"object": "chat.completion.chunk", "id": "", "created": 1, "model": "m",
                       "system_fingerprint": "3.3.7", "choices": [choice]})  # fmt: skip


USAGE = json.dumps({"object": "chat.completion.chunk", "id": "", "created": 1, "model": "m",
                    "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                             "total_tokens": 5}})  # fmt: skip
ERROR = json.dumps({"error": "Request failed during generation", "error_type": "generation"})


class Batches:
    """A tier call's batches after the first, and then, if given, a failure."""

    def __init__(self, *batches: Batch, fail: Exception | None = None) -> None:
        self._items = self._run(batches, fail)
        self.pulled = 0

    async def _run(self, batches: tuple[Batch, ...], fail: Exception | None) -> AsyncIterator[Any]:
        for batch in batches:
            self.pulled += 1
            yield batch
        if fail is not None:
            raise fail

    def __anext__(self) -> Any:
        return self._items.__anext__()

    def cancel(self) -> None:
        pass


def writes(events: AsyncIterator[bytes]) -> list[bytes]:
    async def collect() -> list[bytes]:
        return [w async for w in events]

    return asyncio.run(collect())


def data(write: bytes) -> list[str]:
    return [e.removeprefix(b"data: ").decode() for e in write.split(b"\n\n") if e]


def openai(first: Batch, rest: Batches) -> tuple[list[bytes], Tally]:
    tally = Tally()
    normaliser = Normaliser(parse_openai("chat", CHAT))
    return writes(openai_events(normaliser, tally, first, rest)), tally


def test_a_batch_is_one_write_and_the_engines_done_ends_the_last() -> None:
    rest = Batches([token("c", "stop"), USAGE, "[DONE]"])
    out, request = openai([token("a"), token("b")], rest)
    assert len(out) == 2
    first, last = data(out[0]), data(out[1])
    assert [json.loads(e)["choices"][0]["delta"]["content"] for e in first] == ["a", "b"]
    assert last[-1] == "[DONE]" and out[1].count(DONE) == 1 and out[0].count(DONE) == 0
    assert request.status is None and request.ended
    assert request.usage == Usage(3, 2) and request.tokens == 3  # the engine's own count wins


def test_an_error_inside_a_batch_sends_what_came_before_it_then_the_error_and_done() -> None:
    rest = Batches([token("never")])
    out, request = openai([token("a"), ERROR, token("b")], rest)
    assert len(out) == 1
    events = data(out[0])
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "a"
    assert json.loads(events[1])["error"]["type"] == "server_error"
    assert events[2:] == ["[DONE]"]
    assert request.status == 500 and rest.pulled == 0  # nothing read past the error


def test_a_failure_between_batches_is_an_error_event_then_done() -> None:
    rest = Batches([token("b")], fail=EngineUnavailable("engine gone"))
    out, request = openai([token("a")], rest)
    assert len(out) == 3
    assert json.loads(data(out[2])[0])["error"]["type"] == "server_error"
    assert data(out[2])[-1] == "[DONE]"
    assert request.status == 503


def test_a_stream_the_engine_ends_without_done_still_ends_with_one() -> None:
    out, request = openai([token("a", "stop")], Batches())
    assert data(out[-1]) == ["[DONE]"] and b"".join(out).count(DONE) == 1
    assert request.ended and request.tokens == 1 and request.usage is None


def test_tgi_events_pass_each_batch_as_one_write_and_count_its_tokens() -> None:
    events = [json.dumps({"index": i, "token": {"id": i, "text": "x"}}) for i in range(3)]
    request = Tally()
    out = writes(tgi_events(request, events[:2], Batches(events[2:])))
    assert [data(w) for w in out] == [events[:2], events[2:]]
    assert request.tokens == 3 and request.ended
