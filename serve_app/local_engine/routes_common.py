"""What every route shares: the engine state, request bodies and fields, client disconnects, SSE
framing and the headers of a finished generation."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from .backend import Backend, Finished, Token
from .cli import EngineArgs
from .headers import answer_headers
from .scheduler import Scheduler, StreamItem, Timing
from .validation import EngineError, Sampling, check_lengths, invalid, rejected, wrong_shape

T = TypeVar("T")
TGI_VERSION = "3.3.7"


@dataclass
class Engine:
    """What every route needs: limits, the scheduler and the backend behind it."""

    args: EngineArgs
    scheduler: Scheduler
    backend: Backend

    async def prepare(
        self, prompt: str, sampling: Sampling
    ) -> tuple[Sampling, list[tuple[int, str]], str]:
        """Tokenize and check the token budget; `truncate` keeps the prompt's last tokens."""
        if not prompt:
            raise invalid("`inputs` cannot be empty")
        tokens = await self.backend.tokenize(prompt)
        sampling = check_lengths(sampling, len(tokens), self.args)
        if sampling.truncate is not None and len(tokens) > sampling.truncate:
            tokens = tokens[-sampling.truncate :]
            prompt = "".join(piece for _, piece in tokens)
        return sampling, tokens, prompt

    def run(
        self, request: Request, prompt: str, sampling: Sampling, input_length: int
    ) -> AsyncIterator[StreamItem]:
        return self.scheduler.stream(prompt, sampling, input_length, received(request))


class ReleasingResponse(Response):
    """Holds a request's concurrency permit until its answer has been sent, streamed or not,
    and whether the client stayed or left."""

    def __init__(self, inner: Response, release: Callable[[], None]) -> None:
        self._inner = inner
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._inner(scope, receive, send)
        finally:
            self._release()


def error_response(exc: EngineError) -> Response:
    if exc.plain:
        return PlainTextResponse(exc.message, status_code=exc.status)
    return JSONResponse(exc.body(), status_code=exc.status)


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


async def until_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run `work` (after the body has been read) unless the client leaves first: then it is
    cancelled, which closes its generation and frees its batch slot at once, as TGI does."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        raise ClientGone
    return task.result()


def sse(payload: Any) -> bytes:
    return b"data:" + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def token_json(token: Token) -> dict[str, Any]:
    return {"id": token.id, "text": token.text, "logprob": token.logprob, "special": token.special}


def engine(request: Request) -> Engine:
    return request.app.state.engine  # type: ignore[no-any-return]


async def read_json(request: Request) -> dict[str, Any]:
    """The body as TGI's JSON extractor takes it: content type, size, syntax, then shape."""
    content_type = request.headers.get("content-type", "")
    if not content_type.split(";")[0].strip().endswith("json"):
        raise rejected(415, "Expected request with `Content-Type: application/json`")
    limit = engine(request).args.payload_limit
    body = await request.body()
    if len(body) > limit:
        raise rejected(413, "Failed to buffer the request body: length limit exceeded")
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except ValueError as exc:
        raise rejected(400, f"Failed to parse the request body as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise wrong_shape(f"invalid type: {type(data).__name__}, expected a map")
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def field(data: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    value = data.get(name, default)
    if value is not None and (
        not isinstance(value, kind) or isinstance(value, bool) != (kind is bool)
    ):
        raise wrong_shape(f"{name}: invalid type, expected {kind.__name__}")
    return value


def required(data: dict[str, Any], name: str, kind: type) -> Any:
    if data.get(name) is None:
        raise wrong_shape(f"missing field `{name}`")
    return field(data, name, kind)


async def stream_events(
    events: AsyncIterator[bytes], *, done: bytes | None = None, headers: dict[str, str]
) -> StreamingResponse:
    """Start an SSE response. Errors before the first event keep their HTTP status; later
    errors become an error event on the open stream, as TGI sends them."""
    first = await anext(events)

    async def body() -> AsyncIterator[bytes]:
        yield first
        try:
            async for event in events:
                yield event
        except EngineError as exc:
            yield sse(exc.body())
            return
        if done is not None:
            yield done

    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


def received(request: Request) -> float:
    return request.state.received  # type: ignore[no-any-return]


def finished_headers(
    request: Request, characters: int, timing: Timing | None, prompt: int, fin: Finished
) -> dict[str, str]:
    assert timing is not None, "the last item carries the timing"
    args = engine(request).args
    return answer_headers(
        args.compute_type, characters, received(request), timing, prompt, fin.generated_tokens
    )


async def collect(items: AsyncIterator[StreamItem]) -> tuple[list[StreamItem], Finished]:
    collected = [i async for i in items]
    finished = collected[-1].finished
    assert finished is not None, "the last item carries the finish"
    return collected, finished


def simple_tokens(text: str, tokens: list[tuple[int, str]]) -> list[dict[str, Any]]:
    """TGI's SimpleToken list: each piece with its character offsets in `text`."""
    out, cursor = [], 0
    for tid, piece in tokens:
        start = text.find(piece, cursor) if piece else -1
        start = cursor if start < 0 else start
        cursor = start + len(piece)
        out.append({"id": tid, "text": piece, "start": start, "stop": cursor})
    return out
