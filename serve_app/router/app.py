"""The router's route table and handlers: HTTP in, a tier's handle out."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..config import AppConfig
from ..engine.client import EngineReply, reply_error, stream_error
from ..errors import (
    EngineReplyError,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    TierUnavailable,
)
from ..metrics import InFlight, RequestTimer, app_metrics
from ..tier.policy import RequestTraits, TierChoice, TierPolicy
from ..tier.replica_choice import route_hint
from ..tier.request_router import session_header
from . import tgi
from .admission import admissions, leaving
from .auth import Tenant, key_ring
from .errors import api_error
from .openai import SSE_DONE, Kind, Normaliser, parse_model, parse_request, sse
from .quota import Quotas

Handler = Callable[[Request], Awaitable[Response]]
StreamStart = tuple[str | None, DeploymentResponseGenerator]
ENGINE_BUSY_ATTEMPTS = 2  # a 429 from an engine, before any token, is tried once more


class Router:
    def __init__(self, config: AppConfig, tiers: Mapping[str, DeploymentHandle]) -> None:
        self._config = config
        self._policy = TierPolicy(config)
        self._in_flight = InFlight()
        self._handles = dict(tiers)
        self._streams = {name: h.options(stream=True) for name, h in tiers.items()}
        self._created = int(time.time())
        self._background: set[asyncio.Future[None]] = set()
        keys = config.router.api_keys
        self._keys = key_ring(keys)
        self._quotas = Quotas(keys.lease_fraction) if keys else None
        self._admissions = admissions(config)

    def asgi_app(self) -> Starlette:
        as_openai, as_tgi = self._openai_errors, self._tgi_errors
        return Starlette(
            routes=[
                Route("/v1/chat/completions", as_openai(self.chat_completions), methods=["POST"]),
                Route("/v1/completions", as_openai(self.completions), methods=["POST"]),
                Route("/v1/models", as_openai(self.list_models), methods=["GET"]),
                Route("/v1/models/{model:path}", as_openai(self.get_model), methods=["GET"]),
                Route("/generate", as_tgi(self.generate), methods=["POST"]),
                Route("/generate_stream", as_tgi(self.generate_stream), methods=["POST"]),
                Route("/", as_tgi(self.compat_generate), methods=["POST"]),
                Route("/info", as_tgi(self.info), methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
            ],
        )

    # -- OpenAI ---------------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        return await self._openai(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._openai(request, "completion")

    async def _openai(self, request: Request, kind: Kind) -> Response:
        body = await self._json_body(request)
        model = parse_model(body)
        choice = self._policy.for_model(model, _traits(body, request), self._in_flight.by_tier)
        tier = choice.tier
        if choice.spilled_from:
            app_metrics().spill_overs.inc(1, {"tier": choice.spilled_from, "to_tier": tier})
        parsed = parse_request(kind, body, model, self._config.tier(tier))
        await self._admit(request, tier)
        normaliser = Normaliser(parsed)
        headers = _headers(choice)
        timer = RequestTimer(tier, self._in_flight, self._account(request, tier))
        try:
            if not parsed.stream:
                reply = await self._request(tier, parsed.engine_path, parsed.payload)
                if reply.status != 200:
                    raise reply_error(reply.status, reply.body)
                answer = normaliser.complete(json.loads(reply.body))
                timer.finish(200, answer.get("usage"))
                return JSONResponse(answer, headers=headers)
            first, chunks = await self._stream(tier, parsed.engine_path, parsed.payload)
        except Exception as exc:
            timer.finish(api_error(exc).status, None)
            raise
        events = _openai_events(normaliser, timer, first, chunks)
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)

    async def list_models(self, request: Request) -> Response:
        data = [self._model_card(name) for name in self._policy.model_names]
        return JSONResponse({"object": "list", "data": data})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if not self._policy.is_model(name):
            raise ModelNotFound(f"The model {name!r} does not exist", param="model")
        return JSONResponse(self._model_card(name))

    def _model_card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self._created, "owned_by": "serve-app"}

    # -- TGI native: bodies and answers pass through unchanged ------------------------------------

    async def generate(self, request: Request) -> Response:
        return await self._tgi_request(request, "/generate")

    async def generate_stream(self, request: Request) -> Response:
        return await self._tgi_stream(request, "/generate_stream", await self._json_body(request))

    async def compat_generate(self, request: Request) -> Response:
        body = await self._json_body(request)
        if body.get("stream") is True:
            return await self._tgi_stream(request, "/", body)
        return await self._tgi_request(request, "/", body)

    async def info(self, request: Request) -> Response:
        choice = self._policy.for_header(request.headers.get("x-tier"))
        if request.state.tenant is not None:
            request.state.tenant.check_tier(choice.tier)
        info = await self._handles[choice.tier].info.remote()
        return JSONResponse(info, headers=_headers(choice))

    async def _tgi_request(
        self, request: Request, path: str, body: dict[str, Any] | None = None
    ) -> Response:
        body = body if body is not None else await self._json_body(request)
        choice = self._policy.for_header(request.headers.get("x-tier"))
        await self._admit(request, choice.tier)
        body = tgi.bounded(body, self._config.tier(choice.tier))
        reply = await self._request(choice.tier, path, body)
        return Response(
            reply.body, reply.status, media_type="application/json", headers=_headers(choice)
        )

    async def _tgi_stream(self, request: Request, path: str, body: dict[str, Any]) -> Response:
        choice = self._policy.for_header(request.headers.get("x-tier"))
        await self._admit(request, choice.tier)
        body = tgi.bounded(body, self._config.tier(choice.tier))
        first, chunks = await self._stream(choice.tier, path, body)
        events = _tgi_events(first, chunks)
        return StreamingResponse(events, media_type="text/event-stream", headers=_headers(choice))

    # -- who may call, and how much --------------------------------------------------------------

    def _guarded(self, handler: Handler, *, tgi: bool) -> Handler:
        """The one boundary where errors become HTTP answers; API keys are checked here."""

        async def route(request: Request) -> Response:
            request.state.tenant = None
            try:
                if self._keys is not None:
                    request.state.tenant = self._keys.authenticate(request.headers)
                return await handler(request)
            except Exception as exc:
                error = api_error(exc)
                if request.state.tenant is not None and error.status in (403, 429):
                    app_metrics().tenant_rejections.inc(
                        1, {"tenant": request.state.tenant.name, "reason": error.code or ""}
                    )
                return error.response(tgi=tgi)

        return leaving(route)  # admission (issue 16): the tier's turn is left on every exit

    def _openai_errors(self, handler: Handler) -> Handler:
        return self._guarded(handler, tgi=False)

    def _tgi_errors(self, handler: Handler) -> Handler:
        return self._guarded(handler, tgi=True)

    async def _admit(self, request: Request, tier: str) -> None:
        """The caller's key may use this tier, and has quota left; then its turn in the
        tier's admission queue, if the tier has one."""
        tenant: Tenant | None = request.state.tenant
        if tenant is not None:
            await self._admit_tenant(tenant, tier)
        if tier in self._admissions:  # issue 16: fair, prioritised admission
            cost = self._config.tier(tier).default_max_tokens
            await request.state.admitted.enter(self._admissions[tier], request, cost)

    async def _admit_tenant(self, tenant: Tenant, tier: str) -> None:
        tenant.check_tier(tier)
        if self._quotas is not None:
            await self._quotas.admit(tenant)
        app_metrics().tenant_requests.inc(1, {"tenant": tenant.name, "tier": tier})

    def _account(self, request: Request, tier: str) -> Callable[[dict[str, Any] | None], None]:
        """What to do with an answer's usage once it is known: count it, charge the quota."""
        tenant: Tenant | None = request.state.tenant

        def account(usage: dict[str, Any] | None) -> None:
            request.state.admitted.leave(int(usage.get("total_tokens") or 0) if usage else None)
            if tenant is None or not usage:
                return
            tokens = int(usage.get("total_tokens") or 0)
            app_metrics().tenant_tokens.inc(tokens, {"tenant": tenant.name, "tier": tier})
            if self._quotas is not None:
                task = asyncio.ensure_future(self._quotas.spend(tenant, tokens))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

        return account

    # -- dispatch to a tier, bounded in time ---------------------------------------------------

    async def _request(self, tier: str, path: str, body: dict[str, Any]) -> EngineReply:
        for attempt in range(ENGINE_BUSY_ATTEMPTS):
            replies = self._routed(tier, body).request.remote(path, body)
            await self._taken(tier, replies)
            try:
                reply = await anext(replies, None)
            finally:
                replies.cancel()
            assert reply is not None, "a tier replica ends every request with its reply"
            if reply.status != 429 or attempt == ENGINE_BUSY_ATTEMPTS - 1:
                return reply
        raise AssertionError("unreachable")

    async def _stream(self, tier: str, path: str, body: dict[str, Any]) -> StreamStart:
        """Start a stream and wait for its first chunk, so that an error before any token
        keeps its HTTP status. An engine at capacity (429) is tried once more: nothing has
        been sent yet, and Serve may pick another replica."""
        for attempt in range(ENGINE_BUSY_ATTEMPTS):
            chunks = self._routed(tier, body).stream.remote(path, body)
            await self._taken(tier, chunks)
            try:
                return await anext(chunks, None), chunks
            except EngineReplyError as exc:
                chunks.cancel()
                if exc.status != 429 or attempt == ENGINE_BUSY_ATTEMPTS - 1:
                    raise
            except BaseException:
                chunks.cancel()
                raise
        raise AssertionError("unreachable")

    def _routed(self, tier: str, body: dict[str, Any]) -> DeploymentHandle:
        """Replica choice (`serve_app.tier.replica_choice`): for a tier with `routing`, the
        request's hint (prefix key or `x-session-id`, sizes) rides in Serve's session id."""
        routing = self._config.tier(tier).routing
        if routing is None:
            return self._streams[tier]
        default = self._config.tier(tier).default_max_tokens
        hint = route_hint(body, session_header(), default, routing)
        return self._streams[tier].options(session_id=hint.encode())

    async def _taken(self, tier: str, calls: DeploymentResponseGenerator) -> None:
        """Wait, within the tier's `replica_wait_timeout_s`, for a replica to take the call."""
        try:
            await asyncio.wait_for(anext(calls), self._config.tier(tier).replica_wait_timeout_s)
        except asyncio.TimeoutError:
            calls.cancel()
            raise self._unavailable(tier) from None

    def _unavailable(self, tier: str) -> TierUnavailable:
        timeout = self._config.tier(tier).replica_wait_timeout_s
        return TierUnavailable(
            f"no replica of tier {tier!r} took the request within {timeout:.0f}s "
            "(replica_wait_timeout_s): the tier is starting or saturated; retry later"
        )

    # -- service --------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _json_body(self, request: Request) -> dict[str, Any]:
        limit = self._config.router.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
        raw = await request.body()
        if len(raw) > limit:
            raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
        try:
            body = json.loads(raw, parse_constant=_reject_constant)
        except ValueError as exc:
            raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object")
        return body


def _reject_constant(name: str) -> Any:
    """NaN and Infinity are not JSON, though Python's parser takes them."""
    raise ValueError(f"{name} is not a JSON value")


def _headers(choice: TierChoice) -> dict[str, str]:
    # Serve's proxy already echoes or assigns `x-request-id`.
    return {"x-tier": choice.tier, "x-tier-reason": choice.reason}


def _traits(body: dict[str, Any], request: Request) -> RequestTraits:
    """What the `auto` rules look at: prompt size, asked tokens, headers."""
    if isinstance(body.get("messages"), list):
        chars = sum(_text_length(m.get("content")) for m in body["messages"] if isinstance(m, dict))
    else:
        chars = _text_length(body.get("prompt"))
    asked = body.get("max_completion_tokens", body.get("max_tokens"))
    return RequestTraits(
        prompt_chars=chars,
        max_tokens=asked if isinstance(asked, int) else None,
        headers={k.lower(): v for k, v in request.headers.items()},
    )


def _text_length(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):  # content parts, or a list of prompts
        return sum(_text_length(p.get("text") if isinstance(p, dict) else p) for p in content)
    return 0


async def _openai_events(
    normaliser: Normaliser,
    timer: RequestTimer,
    first: str | None,
    chunks: DeploymentResponseGenerator,
) -> AsyncIterator[bytes]:
    """Normalised chunks, then `[DONE]`. An error after the first token is sent as an error
    event and the stream still ends cleanly."""
    status = 200
    try:
        data = first
        while data is not None:
            if data != "[DONE]":
                timer.chunk()
                chunk = json.loads(data)
                if "error" in chunk:
                    error = api_error(stream_error(data))
                    status = error.status
                    yield sse(error.openai_body())
                    break
                for event in normaliser.chunk(chunk):
                    yield event
            data = await anext(chunks, None)
    except Exception as exc:
        error = api_error(exc)
        status = error.status
        yield sse(error.openai_body())
    finally:
        chunks.cancel()  # a client that went away stops the engine's generation too
        timer.finish(status, normaliser.usage)
    yield SSE_DONE


async def _tgi_events(
    first: str | None, chunks: DeploymentResponseGenerator
) -> AsyncIterator[bytes]:
    try:
        data = first
        while data is not None:
            yield b"data:" + data.encode() + b"\n\n"
            data = await anext(chunks, None)
    except Exception as exc:
        yield b"data:" + json.dumps(api_error(exc).tgi_body()).encode() + b"\n\n"
    finally:
        chunks.cancel()
