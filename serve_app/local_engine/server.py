"""TGI 3.3's HTTP API over the local backend: the route table, the service routes and the
boundary every request passes (API key, admission, error answers)."""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from . import tracing
from .openai_routes import (
    chat_completions,
    chat_tokenize,
    completions,
    models,
    run_chat_completions,
    run_completions,
)
from .routes_common import (
    TGI_VERSION,
    ClientGone,
    Engine,
    ReleasingResponse,
    engine,
    error_response,
    field,
    read_json,
)
from .scheduler import exposition
from .tgi_routes import (
    compat_generate,
    generate,
    generate_stream,
    run_generate,
    run_generate_stream,
    tokenize,
)
from .validation import EngineError

__all__ = ["Engine", "create_app"]

Handler = Callable[[Request], Awaitable[Response]]


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


async def invocations(request: Request) -> Response:
    """SageMaker's single route: chat, completion or TGI compat, told apart by the body."""
    data = await read_json(request)
    if "messages" in data:
        return await run_chat_completions(request, data)
    if "prompt" in data:
        return await run_completions(request, data)
    if field(data, "stream", bool, False):
        return await run_generate_stream(request, data)
    answer, headers = await run_generate(request, data)
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
