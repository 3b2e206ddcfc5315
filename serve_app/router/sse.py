"""The router's one SSE encoder, for OpenAI's and TGI's streams alike, and the streamed
answers built on it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..engine.client import stream_error
from ..engine.sse import Batch
from .accounting import CLIENT_CLOSED, RequestScope, usage_from
from .errors import api_error
from .tgi import stream_tokens

if TYPE_CHECKING:
    from .dispatch import Calls
    from .openai import Normaliser

DONE = b"data: [DONE]\n\n"


def event(data: str) -> bytes:
    """One `data:` event holding `data` as it is (the engine's own JSON, passed through)."""
    return b"data: " + data.encode() + b"\n\n"


def json_event(payload: Any) -> bytes:
    return event(json.dumps(payload, separators=(",", ":")))


class ScopedStream(StreamingResponse):
    """An SSE answer that settles its request scope and cancels the tier's stream however it
    ends: done, failed, or cut by the client before or during the stream."""

    def __init__(
        self,
        events: AsyncIterator[bytes],
        scope: RequestScope,
        calls: Calls[Batch | None],
        headers: Mapping[str, str],
    ) -> None:
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self._scope = scope
        self._calls = calls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        error: BaseException | None = None
        try:
            await super().__call__(scope, receive, send)
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._calls.cancel()  # a client that went away stops the engine's generation too
            if error is None and not self._scope.ended and self._scope.status == 200:
                self._scope.status = CLIENT_CLOSED
            self._scope.close(error)


async def openai_events(
    normaliser: Normaliser,
    scope: RequestScope,
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
                chunk = json.loads(data)
                tokens += _openai_tokens(chunk)
                events += 1
                if "error" in chunk:
                    error = api_error(stream_error(data))
                    scope.status = error.status
                    out.append(json_event(error.openai_body()))
                    batch = None
                    break
                scope.report(usage_from(chunk))
                out += normaliser.chunk(chunk)
            if events:
                scope.chunk(tokens)
            if batch is None:
                break
            if out:
                yield b"".join(out)
                out = []
            batch = await anext(batches, None)  # to the end: the connection is then reused
    except Exception as exc:
        if not done:  # after `[DONE]` the client has the whole answer already
            error = api_error(exc)
            scope.status = error.status
            out.append(json_event(error.openai_body()))
    if not done:
        out.append(DONE)
    if out:
        yield b"".join(out)
    scope.ended = True


async def tgi_events(
    scope: RequestScope, first: Batch | None, batches: Calls[Batch | None]
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
                    scope.status = api_error(stream_error(data)).tgi_status()
            scope.chunk(tokens)
            yield b"".join([event(data) for data in batch])
            batch = await anext(batches, None)
    except Exception as exc:
        error = api_error(exc)
        scope.status = error.tgi_status()
        yield json_event(error.tgi_body())
    scope.ended = True


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
