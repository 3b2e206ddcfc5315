"""Traces of one request, from the router through a tier replica into the engine.

Off unless the application's config has `tracing`; OpenTelemetry (the `tracing` extra) is then
imported, and every process exports its spans over OTLP/gRPC to `tracing.otlp_endpoint`. Nothing
else in the application touches OpenTelemetry: it starts, annotates and ends spans through this
module.

- The router opens one SERVER span per request (`Tracing.start`), a child of the caller's W3C
  `traceparent` when there is one. It records the tier (and why), the tenant (never the key),
  waiting for a replica, the first token and the token counts (`gen_ai.*` attributes).
- The router hands the context to the tier replica as a W3C carrier (`RequestTrace.carrier`,
  `traceparent`, `tracestate` and the tenant as `baggage`); the replica opens its span under it
  (`Tracing.span`) and sends its own `traceparent` to the engine with the HTTP call.
- Engines (TGI, the local engine) are started with `--otlp-endpoint`/`--otlp-service-name`
  (`engine_flags`) and export their own spans as children of that `traceparent`.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .config import TierConfig, TracingConfig

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

ENGINE_SERVICE_SUFFIX = "-engine"
INSTRUMENTATION = "serve_app"
EXPORT_DELAY_MS = 1000  # spans leave a process within a second of ending
USAGE_ATTRIBUTES = {
    "prompt_tokens": "gen_ai.usage.input_tokens",
    "completion_tokens": "gen_ai.usage.output_tokens",
}


class TracingUnavailable(RuntimeError):
    """Tracing is configured, but OpenTelemetry is not installed."""


def engine_flags(config: TracingConfig | None) -> list[str]:
    """`text-generation-launcher`'s flags that make the engine export spans to the same place."""
    if config is None:
        return []
    return [
        "--otlp-endpoint", config.otlp_endpoint,
        "--otlp-service-name", config.service_name + ENGINE_SERVICE_SUFFIX,
    ]  # fmt: skip


def backend(tier: TierConfig) -> str:
    """`inference.backend`: the engine serving the tier."""
    return tier.engine.launcher  # "tgi", "vllm" or "local"


def tier_attributes(tier: TierConfig) -> dict[str, str]:
    return {
        "tier": tier.name,
        "model_id": tier.engine.model_id,
        "inference.backend": backend(tier),
        "gen_ai.response.model": tier.engine.model_id,
        "serve_app.data_path": tier.tuning.data_path,
    }


def usage_attributes(usage: Mapping[str, Any] | None) -> dict[str, int]:
    """OpenAI `usage` as `gen_ai.usage.*`."""
    if not usage:
        return {}
    return {
        attr: usage[key]
        for key, attr in USAGE_ATTRIBUTES.items()
        if isinstance(usage.get(key), int)
    }


def provider(config: TracingConfig, component: str) -> TracerProvider:
    """A tracer provider exporting over OTLP/gRPC, sampling new traces at `sample_ratio` and
    following the caller's decision for the rest."""
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio
    except ImportError as exc:
        raise TracingUnavailable(
            f"tracing is configured but OpenTelemetry is missing ({exc.name}): "
            "install serve-app[tracing]"
        ) from exc
    resource = Resource.create(
        {
            "service.name": config.service_name,
            "service.instance.id": uuid.uuid4().hex,
            "process.pid": os.getpid(),
            "serve_app.component": component,
        }
    )
    made = TracerProvider(resource=resource, sampler=ParentBasedTraceIdRatio(config.sample_ratio))
    exporter = OTLPSpanExporter(
        endpoint=config.otlp_endpoint, insecure=config.otlp_endpoint.startswith("http://")
    )
    made.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=EXPORT_DELAY_MS))
    return made


def _extract(carrier: Mapping[str, str]) -> Any:
    from opentelemetry.baggage.propagation import W3CBaggagePropagator
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context = TraceContextTextMapPropagator().extract(carrier)
    return W3CBaggagePropagator().extract(carrier, context)


def _inject(span: Span, baggage: Mapping[str, str]) -> dict[str, str]:
    from opentelemetry import baggage as otel_baggage
    from opentelemetry.baggage.propagation import W3CBaggagePropagator
    from opentelemetry.trace import set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context = set_span_in_context(span)
    for key, value in baggage.items():
        context = otel_baggage.set_baggage(key, value, context)
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context)
    W3CBaggagePropagator().inject(carrier, context)
    return carrier


class RequestTrace:
    """One request's span in the router; every method is a no-op when tracing is off."""

    def __init__(self, span: Span | None = None) -> None:
        self._span = span
        self._start = time.perf_counter()
        self._baggage: dict[str, str] = {}
        self._held = False  # a request scope still has to report (usage), see `hold`
        self._answered = False

    def hold(self) -> None:
        """Keep the span open past the response until `release`: a request scope settles (and
        reports its usage) after a streamed body is sent."""
        self._held = True

    def release(self) -> None:
        self._held = False
        if self._answered:
            self._end()

    def abandon(self) -> None:
        """The request was cancelled (the client went away) before it had an answer."""
        if self._span is None:
            return
        self.set({"http.response.status_code": 499})
        self._answered = True
        if not self._held:
            self._end()

    def _end(self) -> None:
        if self._span is not None and self._span.is_recording():
            self._span.end()

    def set(self, attributes: Mapping[str, Any]) -> None:
        if self._span is not None:
            self._span.set_attributes(dict(attributes))

    def event(self, name: str, attributes: Mapping[str, Any] | None = None) -> None:
        if self._span is not None:
            self._span.add_event(name, dict(attributes or {}))

    def tier(self, tier: TierConfig, tenant: str | None) -> None:
        """The tier chosen for the request, and whose request it is."""
        self.set(tier_attributes(tier))
        if tenant is not None:
            self.set({"tenant": tenant})
            self._baggage["tenant"] = tenant

    def admitted(self) -> None:
        """The tenant may use the tier and had quota left."""
        self.event("admitted")

    def usage(self, usage: Mapping[str, Any] | None) -> None:
        self.set(usage_attributes(usage))

    def replica_taken(self) -> None:
        elapsed = time.perf_counter() - self._start
        self.event("replica_taken", {"serve_app.elapsed_s": elapsed})

    def carrier(self) -> dict[str, str]:
        """The W3C headers that make the next hop's span a child of this one."""
        return {} if self._span is None else _inject(self._span, self._baggage)

    def finish(self, response: Response) -> Response:
        """End the span with the response's status: now, or once a streamed body is sent."""
        if self._span is None:
            return response
        self.set({"http.response.status_code": response.status_code})
        reason = response.headers.get("x-tier-reason")
        if reason:
            self.set({"serve_app.tier_reason": reason})
        if response.status_code >= 500:
            from opentelemetry.trace import Status, StatusCode

            self._span.set_status(Status(StatusCode.ERROR))
            self.set({"error.type": str(response.status_code)})
        self._answered = True
        if self._held:  # its request's settlement ends it (`release`)
            return response
        if isinstance(response, StreamingResponse):
            response.body_iterator = self._streamed(response.body_iterator)
        else:
            self._end()
        return response

    def first_token(self) -> None:
        """A held request's stream sent its first token."""
        ttft = time.perf_counter() - self._start
        self.event("first_token", {"serve_app.time_to_first_token_s": ttft})

    async def _streamed(self, body: AsyncIterator[Any]) -> AsyncIterator[Any]:
        assert self._span is not None
        chunks = 0
        try:
            async for chunk in body:
                if chunks == 0:
                    ttft = time.perf_counter() - self._start
                    self.event("first_token", {"serve_app.time_to_first_token_s": ttft})
                chunks += 1
                yield chunk
        finally:
            self.set({"serve_app.stream_chunks": chunks})
            if not self._held:
                self._end()


OFF = RequestTrace()


class ReplicaSpan:
    """A tier replica's span for one call; `headers()` go with the engine request."""

    def __init__(self, span: Span | None) -> None:
        self._span = span
        self._start = time.perf_counter()
        self.chunks = 0

    def headers(self) -> dict[str, str]:
        return {} if self._span is None else _inject(self._span, {})

    def chunk(self) -> None:
        if self._span is not None and self.chunks == 0:
            ttft = time.perf_counter() - self._start
            self._span.add_event("first_token", {"serve_app.time_to_first_token_s": ttft})
        self.chunks += 1

    def status(self, code: int) -> None:
        if self._span is not None:
            self._span.set_attribute("http.response.status_code", code)


class Tracing:
    """A process's tracer: `Tracing.configure(config.tracing, ...)`, or off."""

    def __init__(self, tracer: Tracer | None = None) -> None:
        self._tracer = tracer

    @classmethod
    def configure(cls, config: TracingConfig | None, component: str) -> Tracing:
        if config is None:
            return cls()
        return cls(provider(config, component).get_tracer(INSTRUMENTATION))

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def start(self, request: Request) -> RequestTrace:
        """The router's span for `request` (held by its `RequestLife`)."""
        if self._tracer is None:
            return OFF
        from opentelemetry.trace import SpanKind

        span = self._tracer.start_span(
            f"{request.method} {request.url.path}",
            context=_extract(request.headers),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": request.method, "url.path": request.url.path},
        )
        return RequestTrace(span)

    @contextmanager
    def span(
        self, name: str, carrier: Mapping[str, str] | None, tier: TierConfig
    ) -> Iterator[ReplicaSpan]:
        """A tier replica's span, child of the router's (`carrier`), ended on leaving."""
        if self._tracer is None:
            yield ReplicaSpan(None)
            return
        from opentelemetry import baggage

        context = _extract(carrier or {})
        attributes: dict[str, Any] = tier_attributes(tier)
        tenant = baggage.get_baggage("tenant", context)
        if isinstance(tenant, str):
            attributes["tenant"] = tenant
        span = self._tracer.start_span(name, context=context, attributes=attributes)
        replica = ReplicaSpan(span)
        try:
            yield replica
        except Exception as exc:
            from opentelemetry.trace import Status, StatusCode

            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            span.set_attribute("serve_app.stream_chunks", replica.chunks)
            span.end()
