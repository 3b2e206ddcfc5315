"""The router's one SSE encoder, for OpenAI's and TGI's streams alike, and the streamed
answers built on it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..engine.client import stream_error
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
        calls: Calls[str | None],
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
    first: str | None,
    chunks: Calls[str | None],
) -> AsyncIterator[bytes]:
    """Normalised chunks, then `[DONE]`. An error after the first token is sent as an error
    event and the stream still ends cleanly."""
    try:
        data = first
        while data is not None:
            if data != "[DONE]":
                chunk = json.loads(data)
                scope.chunk(_openai_tokens(chunk))
                if "error" in chunk:
                    error = api_error(stream_error(data))
                    scope.status = error.status
                    yield json_event(error.openai_body())
                    break
                scope.report(usage_from(chunk))
                for item in normaliser.chunk(chunk):
                    yield item
            data = await anext(chunks, None)
    except Exception as exc:
        error = api_error(exc)
        scope.status = error.status
        yield json_event(error.openai_body())
    yield DONE
    scope.ended = True


async def tgi_events(
    scope: RequestScope, first: str | None, chunks: Calls[str | None]
) -> AsyncIterator[bytes]:
    """The engine's events as they are; an error after the first token as TGI's error event."""
    try:
        data = first
        while data is not None:
            scope.chunk(stream_tokens(data))
            if data.startswith('{"error"'):
                scope.status = api_error(stream_error(data)).tgi_status()
            yield event(data)
            data = await anext(chunks, None)
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
