"""The router without Ray: engines answered over real HTTP (`engine_server`), tiers reached in
process, the real quota ledger in process, outcomes recorded in lists; and an ASGI driver that
can hang up like a client does."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from starlette.requests import Request

from serve_app.config import STABLE, AppConfig
from serve_app.engine.client import EngineClient
from serve_app.router.accounting import Usage
from serve_app.router.lifecycle import RequestLife
from serve_app.router.quota import LedgerCalls, QuotaLedger
from serve_app.router.routes import Router
from serve_app.router.versions import targets
from serve_app.tier.call import TierCall
from serve_app.tier.policy import TierChoice

from .doubles import DirectTransport, InProcessLedger
from .engine_server import Engine, engine_server

KEYS = {
    "team-a": {"key": "sk-team-a-0123456789abcdef"},
    "small-only": {"key": "sk-small-only-0123456789abcdef", "tiers": ["small"]},
    "metered": {"key": "sk-metered-0123456789abcdef", "requests_per_minute": 3},
    "tokens": {"key": "sk-tokens-0123456789abcdef", "tokens_per_minute": 300},
}


def bearer(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[name]['key']}"}


@dataclass
class ListRecorder:
    """The router's `Recorder`, into lists."""

    outcomes: list[tuple[str, int, Usage]] = field(default_factory=list)
    gauges: dict[str, int] = field(default_factory=dict)
    spills: list[tuple[str, str]] = field(default_factory=list)
    tokens_by_tenant: dict[str, int] = field(default_factory=dict)
    rejections: list[tuple[str, str]] = field(default_factory=list)
    refusals: list[tuple[str, int]] = field(default_factory=list)
    first_tokens: int = 0
    gaps: list[float] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    rollbacks: list[tuple[str, str, str]] = field(default_factory=list)
    shadows: list[tuple[str, str, Any]] = field(default_factory=list)

    def in_flight(self, tier: str, count: int) -> None:
        self.gauges[tier] = count

    def first_token(self, tier: str, seconds: float, version: str = STABLE) -> None:
        assert seconds >= 0
        self.first_tokens += 1

    def between_tokens(self, tier: str, seconds: float, version: str = STABLE) -> None:
        assert seconds >= 0
        self.gaps.append(seconds)

    def finished(
        self, tier: str, status: int, seconds: float, usage: Usage, version: str = STABLE
    ) -> None:
        self.outcomes.append((tier, status, usage))
        self.versions.append(version)

    def rolled_back(self, tier: str, version: str, reason: str) -> None:
        self.rollbacks.append((tier, version, reason))

    def shadowed(self, tier: str, version: str, comparison: Any) -> None:
        self.shadows.append((tier, version, comparison))

    def refused(self, tier: str, status: int) -> None:
        self.refusals.append((tier, status))

    def spill_over(self, tier: str, to_tier: str) -> None:
        self.spills.append((tier, to_tier))

    def tenant_request(self, tenant: str, tier: str) -> None:
        assert tenant and tier

    def tenant_tokens(self, tenant: str, tier: str, tokens: int, feature: str | None) -> None:
        self.tokens_by_tenant[tenant] = self.tokens_by_tenant.get(tenant, 0) + tokens

    def tenant_rejection(self, tenant: str, reason: str) -> None:
        self.rejections.append((tenant, reason))


def config(tmp: Path, keys: bool = True, **router: Any) -> AppConfig:
    args: dict[str, Any] = {
        "router": {"default_tier": "small", **router},
        "tiers": [
            {"name": "small", "aliases": ["gpt-4o-mini"], "overflow_tier": "large",
             "tuning": {"overflow_at_in_flight": 1}, "default_max_tokens": 8,
             "max_tokens_limit": 64},
            {"name": "large", "default_max_tokens": 8, "max_tokens_limit": 128},
        ],
    }  # fmt: skip
    if keys:
        path = tmp / "keys.yaml"
        path.write_text(yaml.safe_dump([{"name": n, **spec} for n, spec in KEYS.items()]))
        args["router"].setdefault("api_keys", {"file": str(path)})
    return AppConfig.model_validate(args)


def router(
    cfg: AppConfig, engine: Engine, ledger: LedgerCalls | None = None
) -> tuple[Router, ListRecorder, QuotaLedger]:
    recorder = ListRecorder()
    quota = QuotaLedger()
    url = engine_server().serve(engine)
    clients = {key: EngineClient(url, 30) for key in targets(cfg)}  # every version of every tier
    ledger = ledger if ledger is not None else InProcessLedger(quota)
    return Router(cfg, DirectTransport(clients), recorder, ledger), recorder, quota


def admitted(recorder: ListRecorder, tier: str = "small", prompt_chars: int = 8) -> RequestLife:
    """A real `RequestLife` admitted to `tier` (keys off), for the stream and settlement code."""
    cfg = AppConfig.model_validate({"tiers": [{"name": tier}]})
    services = Router(cfg, DirectTransport({}), recorder).services
    request = Request({"type": "http", "method": "POST", "path": "/", "headers": []})
    life = RequestLife(services, request, tgi=False)
    call = TierCall("/v1/chat/completions", {}, True, 8, prompt_chars)

    async def admit() -> None:
        await life.admit(TierChoice(tier, "model"), call)

    asyncio.run(admit())
    return life


# -- a TGI engine's answers ------------------------------------------------------------------


def chat_answer(tokens: int = 3) -> dict[str, Any]:
    return {
        "id": "", "object": "chat.completion", "created": 1, "model": "m",
        "system_fingerprint": "x",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": tokens, "total_tokens": 10 + tokens},
    }  # fmt: skip


def chat_chunk(text: str) -> dict[str, Any]:
    return {"id": "", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "system_fingerprint": "x",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": text},
                         "finish_reason": None}]}  # fmt: skip


async def sse_body(
    events: list[Any], forever: bool = False, item: Any = None
) -> AsyncIterator[bytes]:
    """An engine's SSE stream; `forever` repeats `item` (a chat chunk) until closed."""
    for event in events:
        yield b"data:" + json.dumps(event).encode() + b"\n\n"
    while forever:
        await asyncio.sleep(0.01)
        yield b"data:" + json.dumps(item or chat_chunk("x")).encode() + b"\n\n"


# -- an ASGI client that can hang up ---------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def call(
    app: Any,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    *,
    hang_up_after_chunks: int | None = None,
    raw: bytes | None = None,
    chunks: list[bytes] | None = None,
    send_fails_after_chunks: int | None = None,
) -> Answer:
    """One request through the ASGI app; `hang_up_after_chunks` sends the client's disconnect
    once that many body chunks of the answer arrived."""
    content = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    parts = chunks if chunks is not None else [content]
    hdrs = [(k.lower().encode(), v.encode("latin-1")) for k, v in (headers or {}).items()]
    if chunks is None:
        hdrs.append((b"content-length", str(len(content)).encode()))
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(),
             "query_string": b"", "headers": hdrs, "http_version": "1.1", "scheme": "http",
             "server": ("test", 80), "client": ("test", 1), "root_path": "",
             "asgi": {"spec_version": "2.4" if send_fails_after_chunks else "2.0"}}  # fmt: skip
    sent: list[dict[str, Any]] = []
    gone = asyncio.Event()
    pending = list(parts)

    async def receive() -> dict[str, Any]:
        if pending:
            part = pending.pop(0)
            return {"type": "http.request", "body": part, "more_body": bool(pending)}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        streamed = [m for m in sent if m["type"] == "http.response.body" and m.get("body")]
        if send_fails_after_chunks is not None and len(streamed) >= send_fails_after_chunks:
            raise OSError("the client went away")  # how servers of ASGI 2.4 say it
        sent.append(message)
        body_chunks = [m for m in sent if m["type"] == "http.response.body" and m.get("body")]
        if hang_up_after_chunks is not None and len(body_chunks) >= hang_up_after_chunks:
            gone.set()
        if message["type"] == "http.response.body" and not message.get("more_body"):
            gone.set()

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    out_headers = {k.decode(): v.decode("latin-1") for k, v in start["headers"]}
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return Answer(start["status"], out_headers, data)


# -- engines for the router's tests ----------------------------------------------------------

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CHAT = {"model": "small", "messages": QUESTION, "max_tokens": 8}


TEMPLATE_TOKENS = 4  # what the engines' chat template adds per message


def tokenized(path: str, body: Any) -> httpx.Response:
    """TGI's `/tokenize` and `/chat_tokenize`: a token per word, and the template's per message
    (tools, as TGI adds them to the prompt, a token per word of their JSON)."""
    if path == "/tokenize":
        words = body["inputs"].split()
    else:
        words = [
            t
            for m in body["messages"]
            for t in [*["<t>"] * TEMPLATE_TOKENS, *str(m.get("content", "")).split()]
        ]
        words += json.dumps(body.get("tools", [])).split() if body.get("tools") else []
    tokens = [{"id": i, "text": w, "start": 0, "stop": 0} for i, w in enumerate(words)]
    return httpx.Response(
        200, json=tokens if path == "/tokenize" else {"tokenize_response": tokens}
    )


def engine(request: httpx.Request) -> httpx.Response:
    """A TGI engine: answers at once, streams three tokens and usage."""
    body = json.loads(request.content)
    if request.url.path in ("/tokenize", "/chat_tokenize"):
        return tokenized(request.url.path, body)
    if request.url.path == "/v1/chat/completions" and not body.get("stream"):
        return httpx.Response(200, json=chat_answer())
    if request.url.path == "/v1/chat/completions":
        usage = {**chat_chunk(""), "choices": [], "usage": {"prompt_tokens": 10,
                 "completion_tokens": 3, "total_tokens": 13}}  # fmt: skip
        events = [chat_chunk("Pa"), chat_chunk("r"), chat_chunk("is"), usage]
        return httpx.Response(200, content=sse_body(events))
    if request.url.path == "/generate":
        return httpx.Response(
            200, json={"generated_text": "Paris"},
            headers={"x-prompt-tokens": "7", "x-generated-tokens": "2", "x-compute-time": "0.1",
                     "x-time-per-token": "0.05", "x-request-id": "engine-own"},
        )  # fmt: skip
    if request.url.path == "/generate_stream":
        events = [{"index": i, "token": {"id": i, "text": "a", "logprob": 0, "special": False},
                   "generated_text": None, "details": None} for i in range(4)]  # fmt: skip
        return httpx.Response(200, content=sse_body(events))
    raise AssertionError(request.url.path)


async def slow_engine(request: httpx.Request) -> httpx.Response:
    """An engine that never finishes: whole answers never come, streams never end."""
    body = json.loads(request.content)
    if request.url.path in ("/tokenize", "/chat_tokenize"):
        return tokenized(request.url.path, body)
    if request.url.path == "/generate_stream":
        token = {"index": 0, "token": {"id": 1, "text": "a", "logprob": 0, "special": False}}
        return httpx.Response(200, content=sse_body([token], forever=True, item=token))
    if body.get("stream"):
        return httpx.Response(200, content=sse_body([chat_chunk("a")], forever=True))
    await asyncio.sleep(3600)
    raise AssertionError("unreachable")


def settled(recorder: Any, tiers: tuple[str, ...] = ("small",)) -> bool:
    return all(recorder.gauges.get(t, 0) == 0 for t in tiers)
