"""Spans of the local engine, the way TGI makes them: with `--otlp-endpoint`, every generation
request gets a SERVER span named after its route, a child of the request's W3C `traceparent`,
exported over OTLP/gRPC under `--otlp-service-name`."""

from __future__ import annotations

import atexit
from typing import TYPE_CHECKING

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import TracingConfig
from ..tracing import provider
from .cli import EngineArgs

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

# TGI's span names: its handlers' names.
SPAN_NAMES = {
    "/": "compat_generate",
    "/invocations": "sagemaker_compatibility",
    "/generate": "generate",
    "/generate_stream": "generate_stream",
    "/v1/chat/completions": "chat_completions",
    "/v1/completions": "completions",
}


def middleware(args: EngineArgs) -> list[Middleware]:
    """The tracing middleware when `--otlp-endpoint` is given, else none."""
    if args.otlp_endpoint is None:
        return []
    config = TracingConfig(otlp_endpoint=args.otlp_endpoint, service_name=args.otlp_service_name)
    made = provider(config, "engine")
    atexit.register(made.shutdown)  # what is still batched leaves on exit
    return [Middleware(TraceMiddleware, tracer=made.get_tracer("local_engine"), args=args)]


class TraceMiddleware:
    """A span around each generation request, ended once its answer (streamed or not) is sent;
    it counts the answer's SSE events and marks the first one."""

    def __init__(self, app: ASGIApp, tracer: Tracer, args: EngineArgs) -> None:
        self._app = app
        self._tracer = tracer
        self._attributes = {"model_id": args.model_id, "inference.backend": "local"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = SPAN_NAMES.get(scope.get("path", "")) if scope["type"] == "http" else None
        if name is None:
            await self._app(scope, receive, send)
            return
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        span = self._tracer.start_span(
            name,
            context=TraceContextTextMapPropagator().extract(headers),
            kind=SpanKind.SERVER,
            attributes={**self._attributes, "url.path": scope["path"]},
        )
        events = 0

        async def traced(message: Message) -> None:
            nonlocal events
            if message["type"] == "http.response.start":
                span.set_attribute("http.response.status_code", message["status"])
                if message["status"] >= 500:
                    span.set_status(Status(StatusCode.ERROR))
            elif message["type"] == "http.response.body":
                sent = message.get("body", b"").count(b"data:")
                if sent and not events:
                    span.add_event("first_token")
                events += sent
            await send(message)

        try:
            await self._app(scope, receive, traced)
        except Exception as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            span.set_attribute("serve_app.stream_events", events)
            span.end()
