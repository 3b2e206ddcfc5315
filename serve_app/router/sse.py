"""The router's streamed answers, OpenAI's and TGI's: one write per batch of engine events,
and a `Tally` of what they carried (tokens, the engine's usage, an error's status, whether the
stream reached its end), which the request's settlement reads."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..engine.client import stream_error
from ..engine.sse import DONE, Batch, event, json_event
from .accounting import Usage, usage_from
from .errors import api_error
from .tgi import stream_tokens

if TYPE_CHECKING:
    from .dispatch import Calls
    from .openai import Normaliser


@dataclass
class Tally:
    """What a stream's events carried so far. `on_batch` is told of each batch of engine
    events as its write goes out (the request's timing: first token, gaps between writes)."""

    tokens: int = 0  # generated tokens counted from the events
    batches: int = 0  # batches of events read from the engine
    writes: int = 0  # writes to the client
    usage: Usage | None = None  # the engine's own count, which wins over `tokens`
    status: int | None = None  # an error event's status
    ended: bool = False  # the stream reached its end (else the client cut it)
    on_batch: Callable[[], None] | None = field(default=None, repr=False)

    def batch(self, tokens: int) -> None:
        self.tokens += tokens
        self.batches += 1
        if self.on_batch is not None:
            self.on_batch()

    def report(self, usage: Usage | None) -> None:
        if usage is not None:
            self.usage = usage


async def openai_events(
    normaliser: Normaliser,
    tally: Tally,
    first: Batch | None,
    batches: Calls[Batch | None],
) -> AsyncIterator[bytes]:
    """Normalised chunks, then `[DONE]`, one write per batch the engine's connection gave. An
    error after the first token is sent as an error event and the stream still ends cleanly."""
    out: list[bytes] = []
    done = False
    try:
        batch = first
        while batch is not None:
            tokens = events = 0
            for data in batch:
                if data == "[DONE]":
                    out.append(DONE)
                    done = True
                    continue
                spliced = normaliser.event(data)
                if spliced is not None:
                    out.append(spliced[0])
                    tokens += spliced[1]
                    events += 1
                    continue
                chunk = json.loads(data)
                tokens += _openai_tokens(chunk)
                events += 1
                if "error" in chunk:
                    error = api_error(stream_error(data))
                    tally.status = error.status
                    out.append(json_event(error.openai_body()))
                    batch = None
                    break
                tally.report(usage_from(chunk))
                out += normaliser.chunk(chunk)
            if events:
                tally.batch(tokens)
            if batch is None:
                break
            if out:
                tally.writes += 1
                yield b"".join(out)
                out = []
            batch = await anext(batches, None)  # to the end: the connection is then reused
    except Exception as exc:
        if not done:  # after `[DONE]` the client has the whole answer already
            error = api_error(exc)
            tally.status = error.status
            out.append(json_event(error.openai_body()))
    if not done:
        out.append(DONE)
    if out:
        tally.writes += 1
        yield b"".join(out)
    tally.ended = True


async def tgi_events(
    tally: Tally, first: Batch | None, batches: Calls[Batch | None]
) -> AsyncIterator[bytes]:
    """The engine's events as they are, one write per batch; an error after the first token
    as TGI's error event."""
    try:
        batch = first
        while batch is not None:
            tokens = 0
            for data in batch:
                tokens += stream_tokens(data)
                if data.startswith('{"error"'):
                    tally.status = api_error(stream_error(data)).tgi_status()
            tally.batch(tokens)
            tally.writes += 1
            yield b"".join([event(data) for data in batch])
            batch = await anext(batches, None)
    except Exception as exc:
        error = api_error(exc)
        tally.status = error.tgi_status()
        tally.writes += 1
        yield json_event(error.tgi_body())
    tally.ended = True


def _openai_tokens(chunk: Any) -> int:
    """Generated tokens in one OpenAI chunk from TGI: one per choice that carries any."""
    if not isinstance(chunk, dict) or not isinstance(chunk.get("choices"), list):
        return 0
    count = 0
    for choice in chunk["choices"]:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if choice.get("text") or (
            isinstance(delta, dict) and (delta.get("content") or delta.get("tool_calls"))
        ):
            count += 1
    return count
