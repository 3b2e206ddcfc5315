"""The router's route table and handlers: HTTP in, a typed call to a tier out.

Every generating route goes the same way: read the body (bounded) → pick the tier → build the
`TierCall` → admit (key, tier, quota) → a `RequestScope` that settles on every exit → dispatch.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..config import AppConfig
from ..engine.client import reply_error
from ..engine.sse import Batch
from ..errors import InvalidRequest, ModelNotFound
from ..tier.call import EngineRoute, TierCall
from ..tier.policy import RequestTraits, TierChoice, TierPolicy
from ..tracing import Tracing, current
from .accounting import InFlight, Recorder, RequestScope, Usage, usage_from
from .admission import admissions, leaving, report_queues
from .auth import Tenant, key_ring
from .body import BodyLimits, read_json
from .dispatch import Calls, Dispatcher, TierTransport
from .errors import api_error, rate_limit_headers
from .guard import Guard
from .openai import Kind, Normaliser, parse_model, parse_request
from .quota import LedgerCalls, Quotas
from .sse import ScopedStream, openai_events, tgi_events
from .tgi import reply_usage, tgi_call

Handler = Callable[[Request], Awaitable[Response]]


class Router:
    def __init__(
        self,
        config: AppConfig,
        transport: TierTransport,
        recorder: Recorder,
        ledger: LedgerCalls | None = None,
    ) -> None:
        """`transport` reaches the tiers and `ledger` the quota ledger: Serve handles in the
        deployment, in-process fakes in unit tests."""
        router = config.router
        self._config = config
        self._policy = TierPolicy(config)
        self._recorder = recorder
        self._in_flight = InFlight(recorder)
        self._dispatch = Dispatcher(transport, lambda t: config.tier(t).replica_wait_timeout_s)
        keys = router.api_keys
        quotas = (
            Quotas(ledger, keys.ledger_timeout_s, keys.on_ledger_failure)
            if keys is not None and ledger is not None
            else None
        )
        self._guard = Guard(key_ring(keys), quotas, recorder, router.max_header_bytes)
        self._limits = BodyLimits(
            router.max_body_bytes, router.body_timeout_s, router.max_json_depth
        )
        self._created = int(time.time())
        self._tracing = Tracing.configure(config.tracing, "router")
        self._admissions = admissions(config)  # fair, prioritised queues of tiers that have one

    @property
    def in_flight(self) -> dict[str, int]:
        return dict(self._in_flight.by_tier)

    async def report_queues(self, router: str) -> None:
        """Forever: the admission queues' lengths to their tiers, as router replica `router`
        (a tier scales on them too: `serve_app.autoscaling`). Returns at once without queues."""
        if self._admissions:

            async def send(tier: str, queued: int) -> None:
                await self._dispatch.report_queue(tier, router, queued)

            await report_queues(self._admissions, send)

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
        body = await self._body(request)
        model = parse_model(body)
        tenant: Tenant | None = request.state.tenant
        traits = _traits(body, request)
        choice = self._policy.for_model(
            model, traits, self._in_flight.by_tier, tenant.tiers if tenant else None
        )
        if choice.spilled_from:
            self._recorder.spill_over(choice.spilled_from, choice.tier)
        messages = body.get("messages")
        limit = self._config.router.max_messages
        if isinstance(messages, list) and len(messages) > limit:
            raise InvalidRequest(
                f"`messages` holds {len(messages)} messages, over the limit of {limit}",
                param="messages",
            )
        parsed = parse_request(kind, body, model, self._config.tier(choice.tier))
        max_tokens = parsed.payload.get("max_tokens")
        call = TierCall(
            parsed.engine_path,  # type: ignore[arg-type]
            parsed.payload,
            parsed.stream,
            max_tokens if isinstance(max_tokens, int) else 0,
            traits.prompt_chars,
        )
        normaliser = Normaliser(parsed)
        scope, headers = await self._open(request, choice, call)
        if not call.stream:
            with scope:
                reply = await self._dispatch.request(choice.tier, call)
                if reply.status != 200:
                    raise reply_error(reply.status, reply.body)
                answer = normaliser.complete(json.loads(reply.body))
                scope.report(usage_from(answer))
            return JSONResponse(answer, headers=headers)
        first, chunks = await self._start(scope, choice.tier, call)
        return _streamed(openai_events(normaliser, scope, first, chunks), scope, chunks, headers)

    async def list_models(self, request: Request) -> Response:
        names = self._policy.models_for(_allowed(request))
        return JSONResponse({"object": "list", "data": [self._model_card(n) for n in names]})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name not in self._policy.models_for(_allowed(request)):
            raise ModelNotFound(f"The model {name!r} does not exist", param="model")
        return JSONResponse(self._model_card(name))

    def _model_card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self._created, "owned_by": "serve-app"}

    # -- TGI native: bodies and answers pass through unchanged ------------------------------------

    async def generate(self, request: Request) -> Response:
        return await self._tgi(request, "/generate", stream=False)

    async def generate_stream(self, request: Request) -> Response:
        return await self._tgi(request, "/generate_stream", stream=True)

    async def compat_generate(self, request: Request) -> Response:
        return await self._tgi(request, "/", stream=None)

    async def info(self, request: Request) -> Response:
        choice = self._policy.for_header(request.headers.get("x-tier"))
        if request.state.tenant is not None:
            request.state.tenant.check_tier(choice.tier)
        info = await self._dispatch.info(choice.tier)
        return JSONResponse(info, headers=_headers(choice))

    async def _tgi(self, request: Request, route: EngineRoute, stream: bool | None) -> Response:
        body = await self._body(request)
        if stream is None:  # `POST /` streams when the body says so
            stream = body.get("stream") is True
        choice = self._policy.for_header(request.headers.get("x-tier"))
        call = tgi_call(route, body, self._config.tier(choice.tier), stream)
        scope, headers = await self._open(request, choice, call, tgi=True)
        if not stream:
            with scope:
                reply = await self._dispatch.request(choice.tier, call)
                scope.status = reply.status
                if reply.status == 200:
                    scope.report(reply_usage(reply, call.prompt_chars))
            passed = {**dict(reply.headers), **headers}
            return Response(reply.body, reply.status, media_type="application/json", headers=passed)
        first, chunks = await self._start(scope, choice.tier, call)
        return _streamed(tgi_events(scope, first, chunks), scope, chunks, headers)

    # -- one request's life -------------------------------------------------------------------

    async def _open(
        self, request: Request, choice: TierChoice, call: TierCall, *, tgi: bool = False
    ) -> tuple[RequestScope, dict[str, str]]:
        """Admit the call (key, tier, quota) and open its scope; the answer's headers."""
        tenant: Tenant | None = request.state.tenant
        trace = current()
        trace.tier(self._config.tier(choice.tier), tenant.name if tenant else None)
        reservation = await self._guard.admit(tenant, choice.tier, call)
        if choice.tier in self._admissions:
            try:
                cost = call.token_estimate
                await request.state.admitted.enter(self._admissions[choice.tier], request, cost)
            except BaseException:
                self._guard.settle(tenant, choice.tier, reservation, Usage(0, 0))
                raise
        trace.admitted()
        headers = _headers(choice)
        if reservation is not None:
            headers.update(rate_limit_headers(reservation.limits))

        def settle(usage: Usage) -> None:
            try:
                trace.usage(
                    {
                        "prompt_tokens": usage.prompt_tokens,
                        "completion_tokens": usage.completion_tokens,
                    }
                )
                request.state.admitted.leave(usage.total)  # the queue's turn, if the tier queues
            finally:
                self._guard.settle(tenant, choice.tier, reservation, usage)
                trace.release()

        scope = RequestScope(
            choice.tier, self._in_flight, self._recorder, call.prompt_chars, settle, tgi
        )
        trace.hold()  # the span ends once the scope has settled
        return scope, headers

    async def _start(
        self, scope: RequestScope, tier: str, call: TierCall
    ) -> tuple[Batch | None, Calls[Batch | None]]:
        """Start a stream; a failure before its first chunk settles the scope here."""
        try:
            return await self._dispatch.stream(tier, call)
        except BaseException as exc:
            scope.close(exc)
            raise

    # -- the boundary: keys checked, errors become HTTP answers --------------------------------

    def _guarded(self, handler: Handler, *, tgi: bool) -> Handler:
        async def route(request: Request) -> Response:
            request.state.tenant = None
            # The request's span (tracing), ended with the response, streamed or not.
            trace = self._tracing.start(request)
            try:
                request.state.tenant = self._guard.identify(
                    request.scope["headers"], request.headers
                )
                return trace.finish(await handler(request))
            except Exception as exc:
                error = api_error(exc)
                tenant = request.state.tenant
                if tenant is not None and error.status in (403, 429):
                    self._recorder.tenant_rejection(tenant.name, error.code or "")
                return trace.finish(error.response(tgi=tgi))
            except BaseException:  # cancelled: the client went away
                trace.abandon()
                raise

        # A tier's admission turn is left on every exit, answered or not.
        return leaving(route)

    def _openai_errors(self, handler: Handler) -> Handler:
        return self._guarded(handler, tgi=False)

    def _tgi_errors(self, handler: Handler) -> Handler:
        return self._guarded(handler, tgi=True)

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _body(self, request: Request) -> dict[str, Any]:
        body = await read_json(
            request.stream(), request.headers.get("content-length"), self._limits
        )
        current().body(request.url.path, body)
        return body


def _allowed(request: Request) -> frozenset[str] | None:
    tenant: Tenant | None = request.state.tenant
    return None if tenant is None else tenant.tiers


def _streamed(
    events: AsyncIterator[bytes],
    scope: RequestScope,
    calls: Calls[Batch | None],
    headers: dict[str, str],
) -> ScopedStream:
    """The streamed answer; should it fail to build, the stream is cancelled and the scope
    settled here, since no answer will ever run to do it."""
    try:
        return ScopedStream(events, scope, calls, headers)
    except BaseException as exc:
        calls.cancel()
        scope.close(exc)
        raise


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


def _text_length(content: Any, depth: int = 0) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list) and depth < 2:  # content parts, or a list of prompts
        return sum(
            _text_length(p.get("text") if isinstance(p, dict) else p, depth + 1) for p in content
        )
    return 0
