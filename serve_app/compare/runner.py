"""The eval set sent to each target through the stack: one streamed chat completion per case,
`concurrency` at a time, one target after the other (so that two engines on one machine are
not measured while they compete for it).

Times are taken where a client takes them: the first token is the first chunk with text, and
the gaps between chunks with text are the inter-token times (a chunk may carry several tokens
when the stack coalesces them; the gap is then per chunk). Tokens are the stack's own usage
record (`stream_options.include_usage`), so they are the engine's counts.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from .eval_set import Case


@dataclass
class Sample:
    target: str
    case_id: str
    text: str = ""
    error: str | None = None
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    duration_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class TargetRun:
    target: str
    samples: list[Sample]
    wall_s: float


@dataclass(frozen=True)
class RunSettings:
    url: str
    api_key: str | None = None
    concurrency: int = 4
    max_tokens: int = 64
    temperature: float = 0.0
    timeout_s: float = 120.0


async def run(
    targets: Sequence[str], cases: Sequence[Case], settings: RunSettings
) -> list[TargetRun]:
    headers = {"authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    limits = httpx.Limits(max_connections=settings.concurrency)
    timeout = httpx.Timeout(settings.timeout_s, connect=10)
    async with httpx.AsyncClient(
        base_url=settings.url.rstrip("/"), headers=headers, limits=limits, timeout=timeout
    ) as client:
        runs = []
        for target in targets:
            runs.append(await _run_target(client, target, cases, settings))
        return runs


async def _run_target(
    client: httpx.AsyncClient, target: str, cases: Sequence[Case], settings: RunSettings
) -> TargetRun:
    gate = asyncio.Semaphore(settings.concurrency)

    async def one(case: Case) -> Sample:
        async with gate:
            return await ask(client, target, case, settings)

    started = time.perf_counter()
    samples = await asyncio.gather(*(one(case) for case in cases))
    return TargetRun(target, list(samples), time.perf_counter() - started)


async def ask(client: httpx.AsyncClient, target: str, case: Case, settings: RunSettings) -> Sample:
    sample = Sample(target, case.id)
    body = {
        "model": target,
        "messages": list(case.messages),
        "max_tokens": case.max_tokens or settings.max_tokens,
        "temperature": settings.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = last = time.perf_counter()
    parts: list[str] = []
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
            if reply.status_code != 200:
                await reply.aread()
                sample.error = f"{reply.status_code}: {_message(reply.text)}"
                return sample
            async for line in reply.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    sample.error = f"stream: {_message(json.dumps(event))}"
                    break
                text = "".join(
                    (choice.get("delta") or {}).get("content") or ""
                    for choice in event.get("choices") or ()
                )
                if text:
                    now = time.perf_counter()
                    if sample.ttft_s is None:
                        sample.ttft_s = now - started
                    else:
                        sample.gaps_s.append(now - last)
                    last = now
                    parts.append(text)
                usage = event.get("usage")
                if usage:
                    sample.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    sample.completion_tokens = int(usage.get("completion_tokens") or 0)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        sample.error = f"{type(exc).__name__}: {exc}"
    finally:
        sample.duration_s = time.perf_counter() - started
        sample.text = "".join(parts)
    return sample


def _message(text: str) -> str:
    """The error message of an OpenAI-shaped error body, else the body's start."""
    try:
        error = json.loads(text).get("error")
    except (json.JSONDecodeError, AttributeError):
        return text[:200]
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    return text[:200]
