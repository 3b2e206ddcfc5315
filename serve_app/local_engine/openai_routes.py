"""The OpenAI-compatible routes, the TGI way: chat and text completions, `/v1/models` and
`/chat_tokenize`, with TGI's chat prompt, sampling mapping and logprobs."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .headers import answer_headers, stream_headers
from .routes_common import (
    TGI_VERSION,
    collect,
    engine,
    field,
    finished_headers,
    read_json,
    received,
    required,
    simple_tokens,
    sse,
    stream_events,
    until_disconnected,
)
from .scheduler import StreamItem
from .tools import NO_TOOL, ToolRequest, ToolStream, next_call_id, parse_call, tool_request
from .validation import Sampling, check_sampling, invalid, wrong_shape

FINGERPRINT = f"{TGI_VERSION}-native"
CHAT_FINISH = {"eos_token": "stop", "length": "length", "stop_sequence": "stop_sequence"}


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


def chat_logprobs(items: list[StreamItem]) -> dict[str, Any]:
    """The OpenAI `logprobs` object. A token the model gave no log-probability for (the
    end-of-sequence token, or the empty one that carries an end) has no entry: the
    schema's `logprob` is a number, never null."""
    return {
        "content": [
            {
                "token": i.token.text,
                "logprob": i.token.logprob,
                "top_logprobs": [
                    {"token": t.text, "logprob": t.logprob}
                    for t in i.top_tokens
                    if t.logprob is not None
                ],
            }
            for i in items
            if i.token.logprob is not None
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
    return await run_chat_completions(request, await read_json(request))


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


async def run_chat_completions(request: Request, data: dict[str, Any]) -> Response:
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
        collected, fin = await until_disconnected(request, collect(run.items))
        message: dict[str, Any] = {"role": "assistant", "content": _text(collected)}
        if tools is not None:
            call = parse_call(message["content"])
            if call is None:
                run = await _start_chat(request, messages, plain, None)
                collected, fin = await until_disconnected(request, collect(run.items))
                message = {"role": "assistant", "content": _text(collected)}
            else:
                message = {"role": "assistant", "tool_calls": [call.message("0")]}
        headers = finished_headers(
            request, len(run.prompt), collected[-1].timing, run.prompt_tokens, fin
        )
        answer = {
            **header,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": chat_logprobs(collected) if want_logprobs else None,
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
                        "logprobs": chat_logprobs([item]) if want_logprobs else None,
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
    return await run_completions(request, await read_json(request))


async def run_completions(request: Request, data: dict[str, Any]) -> Response:
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
        collected, fin = await until_disconnected(request, collect(items))
        timing = collected[-1].timing
        assert timing is not None, "the last item carries the timing"
        headers = answer_headers(
            compute_type, characters, received(request), timing, len(prompt_tokens),
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


async def models(request: Request) -> Response:
    """TGI answers with the one model it serves, as a single `ModelInfo`, not a list."""
    model_id = engine(request).args.model_id
    return JSONResponse({"id": model_id, "object": "model", "created": 0, "owned_by": model_id})


async def chat_tokenize(request: Request) -> Response:
    data = await read_json(request)
    messages = _messages(data)
    text = await _chat_prompt(request, messages, tool_request(data))
    tokens = await engine(request).backend.tokenize(text)
    return JSONResponse({"tokenize_response": simple_tokens(text, tokens), "templated_text": text})
