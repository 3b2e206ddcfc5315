"""TGI's own generation routes: `/generate`, `/generate_stream`, the `/` compat route and
`/tokenize`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .headers import stream_headers
from .routes_common import (
    collect,
    engine,
    field,
    finished_headers,
    read_json,
    required,
    simple_tokens,
    sse,
    stream_events,
    token_json,
    until_disconnected,
)
from .validation import check_sampling, invalid


async def _generation(request: Request, data: dict[str, Any], stream: bool):
    inputs = required(data, "inputs", str)
    params = field(data, "parameters", dict, {})
    sampling = check_sampling(params, engine(request).args, stream=stream)
    sampling, prompt_tokens, prompt = await engine(request).prepare(inputs, sampling)
    return inputs, prompt, params, sampling, prompt_tokens


async def generate(request: Request) -> Response:
    data = await read_json(request)
    answer, headers = await run_generate(request, data)
    return JSONResponse(answer, headers=headers)


async def run_generate(
    request: Request, data: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, str]]:
    inputs, prompt, params, sampling, prompt_tokens = await _generation(request, data, False)
    run = engine(request).run(request, prompt, sampling, len(prompt_tokens))
    items, fin = await until_disconnected(request, collect(run))
    headers = finished_headers(request, len(inputs), items[-1].timing, len(prompt_tokens), fin)
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
    return await run_generate_stream(request, await read_json(request))


async def run_generate_stream(request: Request, data: dict[str, Any]) -> Response:
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
        return await run_generate_stream(request, data)
    answer, headers = await run_generate(request, data)
    return JSONResponse([answer], headers=headers)


async def tokenize(request: Request) -> Response:
    data = await read_json(request)
    inputs = required(data, "inputs", str)
    if not inputs:
        raise invalid("`inputs` cannot be empty")
    tokens = await engine(request).backend.tokenize(inputs)
    return JSONResponse(simple_tokens(inputs, tokens))
