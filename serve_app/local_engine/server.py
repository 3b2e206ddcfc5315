"""TGI 3.3's HTTP API over the local backend: the route table and the wire formats."""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from . import tracing
from .backend import Backend, Finished, Token
from .cli import EngineArgs
from .scheduler import Scheduler, StreamItem
from .validation import (
    EngineError,
    Sampling,
    check_lengths,
    check_sampling,
    invalid,
    rejected,
    wrong_shape,
)

Handler = Callable[[Request], Awaitable[Response]]
TGI_VERSION = "3.3.7"
FINGERPRINT = f"{TGI_VERSION}-native"
CHAT_FINISH = {"eos_token": "stop", "length": "length", "stop_sequence": "stop_sequence"}


@dataclass
class Engine:
    """What every route needs: limits, the scheduler and the backend behind it."""

    args: EngineArgs
    scheduler: Scheduler
    backend: Backend

    async def prepare(
        self, prompt: str, sampling: Sampling
    ) -> tuple[Sampling, list[tuple[int, str]]]:
        if not prompt:
            raise invalid("`inputs` cannot be empty")
        tokens = await self.backend.tokenize(prompt)
        return check_lengths(sampling, len(tokens), self.args), tokens

    def run(self, prompt: str, sampling: Sampling, input_length: int) -> AsyncIterator[StreamItem]:
        return self.scheduler.stream(prompt, sampling, input_length)


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


# -- wire helpers -------------------------------------------------------------------------------


def error_response(exc: EngineError) -> Response:
    if exc.plain:
        return PlainTextResponse(exc.message, status_code=exc.status)
    return JSONResponse(exc.body(), status_code=exc.status)


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
    events: AsyncIterator[bytes], *, done: bytes | None = None
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

    return StreamingResponse(body(), media_type="text/event-stream")


# -- TGI native ---------------------------------------------------------------------------------


async def _generation(request: Request, data: dict[str, Any], stream: bool):
    inputs = required(data, "inputs", str)
    params = field(data, "parameters", dict, {})
    sampling = check_sampling(params, engine(request).args, stream=stream)
    sampling, prompt_tokens = await engine(request).prepare(inputs, sampling)
    return inputs, params, sampling, prompt_tokens


async def generate(request: Request) -> Response:
    data = await read_json(request)
    return JSONResponse(await _generate(request, data))


async def _generate(request: Request, data: dict[str, Any]) -> dict[str, Any]:
    inputs, params, sampling, prompt_tokens = await _generation(request, data, stream=False)
    items, fin = await _collect(engine(request).run(inputs, sampling, len(prompt_tokens)))
    text = "".join(i.token.text for i in items if not i.token.special)
    if params.get("return_full_text"):
        text = inputs + text
    answer: dict[str, Any] = {"generated_text": text}
    if params.get("details"):
        details: dict[str, Any] = {
            "finish_reason": fin.reason,
            "generated_tokens": fin.generated_tokens,
            "seed": sampling.seed,
            "prefill": [{"id": tid, "text": piece, "logprob": None} for tid, piece in prompt_tokens]
            if params.get("decoder_input_details")
            else [],
            "tokens": [token_json(i.token) for i in items],
        }
        if sampling.top_n_tokens:
            details["top_tokens"] = [[token_json(t) for t in i.top_tokens] for i in items]
        answer["details"] = details
    return answer


async def generate_stream(request: Request) -> Response:
    return await _generate_stream(request, await read_json(request))


async def _generate_stream(request: Request, data: dict[str, Any]) -> Response:
    inputs, params, sampling, prompt_tokens = await _generation(request, data, stream=True)

    async def events() -> AsyncIterator[bytes]:
        text: list[str] = []
        async for item in engine(request).run(inputs, sampling, len(prompt_tokens)):
            if not item.token.special:
                text.append(item.token.text)
            event: dict[str, Any] = {
                "index": item.index,
                "token": token_json(item.token),
                "generated_text": None,
                "details": None,
            }
            if sampling.top_n_tokens:
                event["top_tokens"] = [token_json(t) for t in item.top_tokens]
            if item.finished is not None:
                full = "".join(text)
                event["generated_text"] = inputs + full if params.get("return_full_text") else full
                event["details"] = {
                    "finish_reason": item.finished.reason,
                    "generated_tokens": item.finished.generated_tokens,
                    "input_length": len(prompt_tokens),
                    "seed": sampling.seed,
                }
            yield sse(event)

    return await stream_events(events())


async def compat_generate(request: Request) -> Response:
    """`POST /`: TGI's compatibility route; a list answer unless `stream` is true."""
    return await _compat_generate(request, await read_json(request))


async def _compat_generate(request: Request, data: dict[str, Any]) -> Response:
    if field(data, "stream", bool, False):
        return await _generate_stream(request, data)
    return JSONResponse([await _generate(request, data)])


def _simple_tokens(text: str, tokens: list[tuple[int, str]]) -> list[dict[str, Any]]:
    """TGI's SimpleToken list: each piece with its character offsets in `text`."""
    out, cursor = [], 0
    for tid, piece in tokens:
        start = text.find(piece, cursor) if piece else -1
        start = cursor if start < 0 else start
        cursor = start + len(piece)
        out.append({"id": tid, "text": piece, "start": start, "stop": cursor})
    return out


async def tokenize(request: Request) -> Response:
    data = await read_json(request)
    inputs = required(data, "inputs", str)
    if not inputs:
        raise invalid("`inputs` cannot be empty")
    tokens = await engine(request).backend.tokenize(inputs)
    return JSONResponse(_simple_tokens(inputs, tokens))


async def chat_tokenize(request: Request) -> Response:
    data = await read_json(request)
    messages = _messages(data)
    text = await engine(request).backend.apply_chat_template(messages)
    tokens = await engine(request).backend.tokenize(text)
    return JSONResponse({"tokenize_response": _simple_tokens(text, tokens), "templated_text": text})


# -- OpenAI-compatible, the TGI way ---------------------------------------------------------------


def _messages(data: dict[str, Any]) -> list[dict[str, Any]]:
    messages = required(data, "messages", list)
    if not messages or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise wrong_shape("messages: expected a non-empty sequence of messages with a `role`")
    return messages


def _openai_sampling(request: Request, data: dict[str, Any], stream: bool) -> Sampling:
    params = {
        "temperature": data.get("temperature"),
        "top_p": data.get("top_p"),
        "frequency_penalty": data.get("frequency_penalty"),
        "seed": data.get("seed"),
        "stop": data.get("stop"),
        "max_new_tokens": data.get("max_completion_tokens", data.get("max_tokens")),
        "top_n_tokens": data.get("top_logprobs") if data.get("logprobs") else None,
    }
    sampling = check_sampling(params, engine(request).args, stream=stream, chat=True)
    fmt = data.get("response_format")
    if fmt is not None:
        schema = _json_schema(fmt)
        sampling = Sampling(**{**sampling.__dict__, "json_schema": schema})
    return sampling


def _json_schema(fmt: Any) -> dict[str, Any]:
    if not isinstance(fmt, dict) or "type" not in fmt:
        raise invalid("`response_format` must be an object with a `type`")
    kind = fmt["type"]
    if kind in ("json", "json_object") and isinstance(fmt.get("value", {}), dict):
        return fmt.get("value") or {"type": "object"}
    if kind == "json_schema" and isinstance(fmt.get("json_schema"), dict):
        return fmt["json_schema"].get("schema") or {"type": "object"}
    if kind == "text":
        return {}
    raise invalid(f"`response_format` type {kind!r} is not supported")


def _logprobs(items: list[StreamItem]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": i.token.text,
                "logprob": i.token.logprob,
                "top_logprobs": [{"token": t.text, "logprob": t.logprob} for t in i.top_tokens],
            }
            for i in items
        ]
    }


def _openai_header(request: Request) -> dict[str, Any]:
    """TGI's fields around every OpenAI-style answer (its `id` is always empty)."""
    return {
        "id": "",
        "created": int(time.time()),
        "model": engine(request).args.model_id,
        "system_fingerprint": FINGERPRINT,
    }


async def _collect(items: AsyncIterator[StreamItem]) -> tuple[list[StreamItem], Finished]:
    collected = [i async for i in items]
    finished = collected[-1].finished
    assert finished is not None, "the last item carries the finish"
    return collected, finished


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


async def chat_completions(request: Request) -> Response:
    return await _chat_completions(request, await read_json(request))


async def _chat_completions(request: Request, data: dict[str, Any]) -> Response:
    messages = _messages(data)
    stream = bool(field(data, "stream", bool, False))
    sampling = _openai_sampling(request, data, stream)
    prompt = await engine(request).backend.apply_chat_template(messages)
    sampling, prompt_tokens = await engine(request).prepare(prompt, sampling)
    want_logprobs = bool(data.get("logprobs"))
    header = _openai_header(request)
    items = engine(request).run(prompt, sampling, len(prompt_tokens))
    if not stream:
        collected, fin = await _collect(items)
        return JSONResponse(
            {
                **header,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": "".join(
                                i.token.text for i in collected if not i.token.special
                            ),
                        },
                        "logprobs": _logprobs(collected) if want_logprobs else None,
                        "finish_reason": CHAT_FINISH[fin.reason],
                    }
                ],
                "usage": _usage(len(prompt_tokens), fin.generated_tokens),
            }
        )
    include_usage = bool((data.get("stream_options") or {}).get("include_usage"))

    async def events() -> AsyncIterator[bytes]:
        async for item in items:
            fin = item.finished
            yield sse(
                {
                    **header,
                    "object": "chat.completion.chunk",
                    "choices": [
                        {
                            "index": 0,
                            "delta": {
                                "role": "assistant",
                                "content": "" if item.token.special else item.token.text,
                            },
                            "logprobs": _logprobs([item]) if want_logprobs else None,
                            "finish_reason": CHAT_FINISH[fin.reason] if fin else None,
                        }
                    ],
                    "usage": _usage(len(prompt_tokens), fin.generated_tokens)
                    if fin and include_usage
                    else None,
                }
            )

    return await stream_events(events(), done=b"data: [DONE]\n\n")


async def completions(request: Request) -> Response:
    return await _completions(request, await read_json(request))


async def _completions(request: Request, data: dict[str, Any]) -> Response:
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise invalid("`prompt` must be a string (or a list holding one string)")
    stream = bool(field(data, "stream", bool, False))
    sampling = _openai_sampling(request, data, stream)
    sampling, prompt_tokens = await engine(request).prepare(prompt, sampling)
    header = _openai_header(request)
    items = engine(request).run(prompt, sampling, len(prompt_tokens))
    if not stream:
        collected, fin = await _collect(items)
        text = "".join(i.token.text for i in collected if not i.token.special)
        return JSONResponse(
            {
                **header,
                "object": "text_completion",
                "choices": [
                    {
                        "index": 0,
                        "text": text,
                        "logprobs": None,
                        "finish_reason": CHAT_FINISH[fin.reason],
                    }
                ],
                "usage": _usage(len(prompt_tokens), fin.generated_tokens),
            }
        )

    async def events() -> AsyncIterator[bytes]:
        async for item in items:
            fin = item.finished
            yield sse(
                {
                    **header,
                    "object": "text_completion",
                    "choices": [
                        {
                            "index": 0,
                            "text": "" if item.token.special else item.token.text,
                            "logprobs": None,
                            # TGI's completion chunks always carry a string here
                            "finish_reason": CHAT_FINISH[fin.reason] if fin else "",
                        }
                    ],
                }
            )

    return await stream_events(events(), done=b"data: [DONE]\n\n")


# -- service routes -----------------------------------------------------------------------------


async def info(request: Request) -> Response:
    args = engine(request).args
    return JSONResponse(
        {
            "model_id": args.model_id,
            "model_sha": None,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": args.max_concurrent_requests,
            "max_best_of": args.max_best_of,
            "max_stop_sequences": args.max_stop_sequences,
            "max_input_tokens": args.max_input_tokens,
            "max_total_tokens": args.max_total_tokens,
            "validation_workers": 1,
            "max_client_batch_size": args.max_client_batch_size,
            "router": "text-generation-router",
            "version": TGI_VERSION,
            "sha": None,
            "docker_label": None,
        }
    )


async def models(request: Request) -> Response:
    """TGI answers with the one model it serves, as a single `ModelInfo`, not a list."""
    model_id = engine(request).args.model_id
    return JSONResponse({"id": model_id, "object": "model", "created": 0, "owned_by": model_id})


async def invocations(request: Request) -> Response:
    """SageMaker's single route: chat, completion or TGI compat, told apart by the body."""
    data = await read_json(request)
    if "messages" in data:
        return await _chat_completions(request, data)
    if "prompt" in data:
        return await _completions(request, data)
    if field(data, "stream", bool, False):
        return await _generate_stream(request, data)
    return JSONResponse(await _generate(request, data))


async def health(request: Request) -> Response:
    return Response(status_code=200)


async def metrics(request: Request) -> Response:
    registry = engine(request).scheduler.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


OPEN_ROUTES = frozenset({"/health", "/metrics", "/info"})
GENERATION_ROUTES = frozenset(
    {
        "/",
        "/invocations",
        "/generate",
        "/generate_stream",
        "/v1/chat/completions",
        "/v1/completions",
    }
)


def _handled(path: str, endpoint: Handler) -> Handler:
    """The one boundary where requests become HTTP answers: the API key is checked, generation
    is admitted (or refused at once with 429, before any validation, as TGI does), and
    `EngineError` becomes TGI's error body."""
    public = path in OPEN_ROUTES
    counted = path in GENERATION_ROUTES

    async def route(request: Request) -> Response:
        state = engine(request)
        api_key = state.args.api_key
        if api_key and not public:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return PlainTextResponse("Unauthorized", status_code=401)
        try:
            if not counted:
                return await endpoint(request)
            state.scheduler.admit()
        except EngineError as exc:
            return error_response(exc)
        try:
            response = await endpoint(request)
        except EngineError as exc:
            response = error_response(exc)
        except BaseException:
            state.scheduler.release()
            raise
        return ReleasingResponse(response, state.scheduler.release)

    return route


ROUTES: list[tuple[str, Handler, list[str]]] = [
    ("/", compat_generate, ["POST"]),
    ("/invocations", invocations, ["POST"]),
    ("/generate", generate, ["POST"]),
    ("/generate_stream", generate_stream, ["POST"]),
    ("/v1/chat/completions", chat_completions, ["POST"]),
    ("/v1/completions", completions, ["POST"]),
    ("/tokenize", tokenize, ["POST"]),
    ("/chat_tokenize", chat_tokenize, ["POST"]),
    ("/v1/models", models, ["GET"]),
    ("/info", info, ["GET"]),
    ("/health", health, ["GET"]),
    ("/metrics", metrics, ["GET"]),
]


def create_app(state: Engine) -> Starlette:
    app = Starlette(
        routes=[Route(path, _handled(path, fn), methods=methods) for path, fn, methods in ROUTES],
        middleware=tracing.middleware(state.args),
    )
    app.state.engine = state
    return app
