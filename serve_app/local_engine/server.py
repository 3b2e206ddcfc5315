"""TGI 3.3's HTTP API over the local backend: the route table and the wire formats."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from . import tracing
from .backend import Backend, Finished, Token
from .cli import EngineArgs
from .headers import answer_headers, stream_headers
from .scheduler import Scheduler, StreamItem, Timing, exposition
from .tools import NO_TOOL, ToolRequest, ToolStream, next_call_id, parse_call, tool_request
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
T = TypeVar("T")
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
        return self.scheduler.stream(prompt, sampling, input_length, _received(request))


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


# -- TGI native ---------------------------------------------------------------------------------


async def _generation(request: Request, data: dict[str, Any], stream: bool):
    inputs = required(data, "inputs", str)
    params = field(data, "parameters", dict, {})
    sampling = check_sampling(params, engine(request).args, stream=stream)
    sampling, prompt_tokens, prompt = await engine(request).prepare(inputs, sampling)
    return inputs, prompt, params, sampling, prompt_tokens


def _received(request: Request) -> float:
    return request.state.received  # type: ignore[no-any-return]


def _answer_headers(
    request: Request, characters: int, timing: Timing | None, prompt: int, fin: Finished
) -> dict[str, str]:
    assert timing is not None, "the last item carries the timing"
    args = engine(request).args
    return answer_headers(
        args.compute_type, characters, _received(request), timing, prompt, fin.generated_tokens
    )


async def generate(request: Request) -> Response:
    data = await read_json(request)
    answer, headers = await _generate(request, data)
    return JSONResponse(answer, headers=headers)


async def _generate(
    request: Request, data: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, str]]:
    inputs, prompt, params, sampling, prompt_tokens = await _generation(request, data, False)
    run = engine(request).run(request, prompt, sampling, len(prompt_tokens))
    items, fin = await until_disconnected(request, _collect(run))
    headers = _answer_headers(request, len(inputs), items[-1].timing, len(prompt_tokens), fin)
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
    return answer, headers


async def generate_stream(request: Request) -> Response:
    return await _generate_stream(request, await read_json(request))


async def _generate_stream(request: Request, data: dict[str, Any]) -> Response:
    inputs, prompt, params, sampling, prompt_tokens = await _generation(request, data, True)

    async def events() -> AsyncIterator[bytes]:
        text: list[str] = []
        async for item in engine(request).run(request, prompt, sampling, len(prompt_tokens)):
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

    headers = stream_headers(engine(request).args.compute_type, len(inputs))
    return await stream_events(events(), headers=headers)


async def compat_generate(request: Request) -> Response:
    """`POST /`: TGI's compatibility route; a list answer unless `stream` is true."""
    return await _compat_generate(request, await read_json(request))


async def _compat_generate(request: Request, data: dict[str, Any]) -> Response:
    if field(data, "stream", bool, False):
        return await _generate_stream(request, data)
    answer, headers = await _generate(request, data)
    return JSONResponse([answer], headers=headers)


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
    text = await _chat_prompt(request, messages, tool_request(data))
    tokens = await engine(request).backend.tokenize(text)
    return JSONResponse({"tokenize_response": _simple_tokens(text, tokens), "templated_text": text})


# -- OpenAI-compatible, the TGI way ---------------------------------------------------------------


def _messages(data: dict[str, Any]) -> list[dict[str, Any]]:
    messages = required(data, "messages", list)
    if not messages or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise wrong_shape("messages: expected a non-empty sequence of messages with a `role`")
    return messages


def _text_content(message: dict[str, Any], i: int) -> str:
    """A message as TGI's chat template sees it: text parts joined, images as Markdown, and an
    assistant's tool calls as their JSON."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, dict) and isinstance(part.get("image_url"), dict):
                parts.append(f"![]({part['image_url'].get('url', '')})")
            else:
                raise wrong_shape(f"messages[{i}].content: expected text or image_url parts")
        return "".join(parts)
    calls = message.get("tool_calls")
    if content is None and isinstance(calls, list):
        return json.dumps([_wire_call(c, i) for c in calls], separators=(",", ":"))
    raise wrong_shape(f"messages[{i}]: expected `content` or `tool_calls`")


def _wire_call(call: Any, i: int) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or "name" not in fn:
        raise wrong_shape(f"messages[{i}].tool_calls: expected calls with a `function`")
    arguments = fn.get("arguments", fn.get("parameters"))
    return {
        "id": call.get("id"),
        "type": call.get("type"),
        "function": {
            "description": fn.get("description"),
            "name": fn["name"],
            "arguments": json.dumps(arguments, separators=(",", ":")),
        },
    }


async def _chat_prompt(
    request: Request, messages: list[dict[str, Any]], tools: ToolRequest | None
) -> str:
    """The chat template applied; with tools, TGI's tool text goes at the end of the last
    message (the built-in model's template has no `tools` variable of its own)."""
    texts = [{"role": m["role"], "content": _text_content(m, i)} for i, m in enumerate(messages)]
    last = messages[-1]
    if tools is not None and not (last.get("content") is None and last.get("tool_calls")):
        texts[-1]["content"] += tools.prompt_suffix()
    return await engine(request).backend.apply_chat_template(texts)


def _openai_sampling(
    request: Request, data: dict[str, Any], stream: bool, tools: ToolRequest | None
) -> Sampling:
    """TGI's mapping of chat fields onto generation parameters: `presence_penalty` becomes
    `repetition_penalty` (plus 2), `top_logprobs` becomes `top_n_tokens`."""
    presence = data.get("presence_penalty")
    params = {
        "temperature": data.get("temperature"),
        "top_p": data.get("top_p"),
        "frequency_penalty": data.get("frequency_penalty"),
        "repetition_penalty": presence + 2.0
        if isinstance(presence, (int, float)) and not isinstance(presence, bool)
        else presence,
        "seed": data.get("seed"),
        "stop": data.get("stop"),
        "max_new_tokens": data.get("max_completion_tokens", data.get("max_tokens")),
        "top_n_tokens": data.get("top_logprobs"),
    }
    sampling = check_sampling(params, engine(request).args, stream=stream, chat=True)
    if tools is not None:
        return replace(sampling, json_schema=tools.schema())
    fmt = data.get("response_format")
    if fmt is not None:
        return replace(sampling, json_schema=_json_schema(fmt))
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


def _text(items: list[StreamItem]) -> str:
    return "".join(i.token.text for i in items if not i.token.special)


@dataclass
class ChatRun:
    """One generation for a chat request: its prompt, budget and tokens."""

    prompt: str
    sampling: Sampling
    prompt_tokens: int
    items: AsyncIterator[StreamItem]


async def chat_completions(request: Request) -> Response:
    return await _chat_completions(request, await read_json(request))


async def _start_chat(
    request: Request,
    messages: list[dict[str, Any]],
    sampling: Sampling,
    tools: ToolRequest | None,
) -> ChatRun:
    prompt = await _chat_prompt(request, messages, tools)
    sampling, tokens, prompt = await engine(request).prepare(prompt, sampling)
    items = engine(request).run(request, prompt, sampling, len(tokens))
    return ChatRun(prompt, sampling, len(tokens), items)


async def _chat_completions(request: Request, data: dict[str, Any]) -> Response:
    messages = _messages(data)
    stream = bool(field(data, "stream", bool, False))
    tools = tool_request(data)
    sampling = _openai_sampling(request, data, stream, tools)
    run = await _start_chat(request, messages, sampling, tools)
    # When the model picks `no_tool`, TGI answers by generating again without tools.
    plain = replace(sampling, json_schema=None)
    want_logprobs = bool(data.get("logprobs"))
    header = _openai_header(request)
    if not stream:
        collected, fin = await until_disconnected(request, _collect(run.items))
        message: dict[str, Any] = {"role": "assistant", "content": _text(collected)}
        if tools is not None:
            call = parse_call(message["content"])
            if call is None:
                run = await _start_chat(request, messages, plain, None)
                collected, fin = await until_disconnected(request, _collect(run.items))
                message = {"role": "assistant", "content": _text(collected)}
            else:
                message = {"role": "assistant", "tool_calls": [call.message("0")]}
        headers = _answer_headers(
            request, len(run.prompt), collected[-1].timing, run.prompt_tokens, fin
        )
        answer = {
            **header,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": _logprobs(collected) if want_logprobs else None,
                    "finish_reason": CHAT_FINISH[fin.reason],
                }
            ],
            "usage": _usage(run.prompt_tokens, fin.generated_tokens),
        }
        return JSONResponse(answer, headers=headers)
    include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
    call_id = next_call_id(messages)

    def chunk(item: StreamItem, delta: dict[str, Any], prompt_tokens: int) -> bytes:
        fin = item.finished
        return sse(
            {
                **header,
                "object": "chat.completion.chunk",
                "choices": [
                    {
                        "index": 0,
                        "delta": delta,
                        "logprobs": _logprobs([item]) if want_logprobs else None,
                        "finish_reason": CHAT_FINISH[fin.reason] if fin else None,
                    }
                ],
                "usage": _usage(prompt_tokens, fin.generated_tokens)
                if fin and include_usage
                else None,
            }
        )

    def content(item: StreamItem) -> dict[str, Any]:
        return {"role": "assistant", "content": "" if item.token.special else item.token.text}

    async def events() -> AsyncIterator[bytes]:
        nonlocal run
        if tools is None:
            async for item in run.items:
                yield chunk(item, content(item), run.prompt_tokens)
            return
        calls = ToolStream()
        async for item in run.items:
            arguments = calls.push("" if item.token.special else item.token.text)
            if calls.name == NO_TOOL:
                await run.items.aclose()  # frees the slot before the second generation
                run = await _start_chat(request, messages, plain, None)
                async for plain_item in run.items:
                    yield chunk(plain_item, content(plain_item), run.prompt_tokens)
                return
            if item.finished is not None:
                arguments = (arguments or "") + calls.finish()
            if calls.name is None and item.finished is None:
                continue  # the name is not known yet: nothing to send, as in TGI
            if calls.name is None:
                yield chunk(item, {"role": "assistant", "content": ""}, run.prompt_tokens)
                continue
            delta = {
                "role": "assistant",
                "tool_calls": [
                    {
                        "index": 0,
                        "id": call_id,
                        "type": "function",
                        "function": {
                            "name": calls.name_once(),
                            "arguments": arguments or "",
                        },
                    }
                ],
            }
            yield chunk(item, delta, run.prompt_tokens)

    headers = stream_headers(engine(request).args.compute_type, len(run.prompt))
    return await stream_events(events(), done=b"data: [DONE]\n\n", headers=headers)


async def completions(request: Request) -> Response:
    return await _completions(request, await read_json(request))


async def _completions(request: Request, data: dict[str, Any]) -> Response:
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise invalid("`prompt` must be a string (or a list holding one string)")
    stream = bool(field(data, "stream", bool, False))
    sampling = _openai_sampling(request, data, stream, None)
    characters = len(prompt)
    sampling, prompt_tokens, prompt = await engine(request).prepare(prompt, sampling)
    header = _openai_header(request)
    items = engine(request).run(request, prompt, sampling, len(prompt_tokens))
    compute_type = engine(request).args.compute_type
    if not stream:
        collected, fin = await until_disconnected(request, _collect(items))
        timing = collected[-1].timing
        assert timing is not None, "the last item carries the timing"
        headers = answer_headers(
            compute_type, characters, _received(request), timing, len(prompt_tokens),
            fin.generated_tokens, compute_time=False,
        )  # fmt: skip
        return JSONResponse(
            {
                **header,
                "object": "text_completion",
                "choices": [
                    {
                        "index": 0,
                        "text": _text(collected),
                        "logprobs": None,
                        "finish_reason": CHAT_FINISH[fin.reason],
                    }
                ],
                "usage": _usage(len(prompt_tokens), fin.generated_tokens),
            },
            headers=headers,
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

    headers = stream_headers(compute_type, characters)
    return await stream_events(events(), done=b"data: [DONE]\n\n", headers=headers)


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
    answer, headers = await _generate(request, data)
    return JSONResponse(answer, headers=headers)


async def health(request: Request) -> Response:
    return Response(status_code=200)


async def metrics(request: Request) -> Response:
    registry = engine(request).scheduler.metrics.registry
    return Response(exposition(registry), media_type=CONTENT_TYPE_LATEST)


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
        request.state.received = time.perf_counter()
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
        except ClientGone:
            response = Response(status_code=499)  # nobody reads it: the client has left
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
