"""serve_app.tracing: attributes, engine flags, and context passed from span to span (with the
real OpenTelemetry SDK exporting to memory)."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from serve_app import tracing
from serve_app.config import EngineConfig, TierConfig, TierTuning, TracingConfig
from serve_app.tracing import OFF, Tracing

CONFIG = TracingConfig(otlp_endpoint="http://collector:4317", service_name="llm")
TIER = TierConfig(name="small")
CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_engine_flags_follow_tgi_launcher_and_are_absent_without_tracing() -> None:
    assert tracing.engine_flags(None) == []
    assert tracing.engine_flags(CONFIG) == [
        "--otlp-endpoint", "http://collector:4317", "--otlp-service-name", "llm-engine",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "fields",
    [{"otlp_endpoint": "collector:4317"}, {"otlp_endpoint": "http://c:4317", "sample_ratio": 2}],
)
def test_bad_tracing_config_is_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        TracingConfig.model_validate(fields)


def test_usage_and_tier_attributes() -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    assert tracing.usage_attributes(usage) == {
        "gen_ai.usage.input_tokens": 5,
        "gen_ai.usage.output_tokens": 7,
    }
    assert tracing.usage_attributes(None) == {}
    gpu = TierConfig(name="big", gpus_per_replica=1, engine=EngineConfig(launcher="tgi"))
    assert tracing.tier_attributes(gpu)["inference.backend"] == "tgi"
    vllm = TierConfig(name="vllm", engine=EngineConfig(launcher="vllm", model_id="/m/smollm2"))
    assert tracing.tier_attributes(vllm)["inference.backend"] == "vllm"
    assert tracing.tier_attributes(TIER) == {
        "tier": "small",
        "model_id": "smollm2-135m-instruct",
        "inference.backend": "local",
        "gen_ai.response.model": "smollm2-135m-instruct",
        "serve_app.data_path": "direct",
    }
    relay = TierConfig(name="small", tuning=TierTuning(data_path="relay"))
    assert tracing.tier_attributes(relay)["serve_app.data_path"] == "relay"


def request(headers: dict[str, str], path: str = "/v1/chat/completions") -> Request:
    raw = [(k.encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "POST", "path": path, "headers": raw})


def test_off_is_a_no_op() -> None:
    off = Tracing.configure(None, "router")
    assert not off.enabled and off.start(request({"traceparent": CALLER})) is OFF
    response = JSONResponse({})
    assert OFF.carrier() == {} and OFF.finish(response) is response
    with off.span("tier", {"traceparent": CALLER}, TIER) as span:
        assert span.headers() == {}


@pytest.fixture
def spans() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider.get_tracer("test")), exporter


def test_router_span_is_the_callers_child_and_the_replicas_parent(
    spans: tuple[Tracing, InMemorySpanExporter],
) -> None:
    traced, exporter = spans
    trace = traced.start(request({"traceparent": CALLER}))
    trace.tier(TIER, "team-a")
    carrier = trace.carrier()
    assert carrier["traceparent"].split("-")[1] == CALLER.split("-")[1]
    assert carrier["baggage"] == "tenant=team-a"
    with traced.span("tier /generate", carrier, TIER) as replica:
        engine_headers = replica.headers()
        replica.chunk()
        replica.status(200)
    assert "baggage" not in engine_headers

    async def body():  # type: ignore[no-untyped-def]
        yield b"data: 1\n\n"
        yield b"data: 2\n\n"

    streamed = trace.finish(StreamingResponse(body(), headers={"x-tier-reason": "model"}))
    assert len(exporter.get_finished_spans()) == 1  # the router's ends with its stream

    async def sent() -> list[bytes]:
        return [c async for c in streamed.body_iterator]

    assert asyncio.run(sent()) == [b"data: 1\n\n", b"data: 2\n\n"]

    tier_span, router_span = exporter.get_finished_spans()
    assert router_span.parent.span_id == int(CALLER.split("-")[2], 16)
    assert tier_span.parent.span_id == router_span.context.span_id
    assert engine_headers["traceparent"].split("-")[2] == f"{tier_span.context.span_id:016x}"
    assert tier_span.attributes["tenant"] == router_span.attributes["tenant"] == "team-a"
    assert router_span.attributes["serve_app.tier_reason"] == "model"
    assert router_span.attributes["serve_app.stream_chunks"] == 2
    assert [e.name for e in router_span.events] == ["first_token"]
    assert [e.name for e in tier_span.events] == ["first_token"]


def test_a_failed_replica_call_marks_its_span(
    spans: tuple[Tracing, InMemorySpanExporter],
) -> None:
    traced, exporter = spans
    with pytest.raises(ConnectionError), traced.span("tier /generate", {}, TIER):
        raise ConnectionError("engine gone")
    (span,) = exporter.get_finished_spans()
    assert not span.status.is_ok and span.events[0].name == "exception"


def test_a_held_span_ends_once_its_scope_settles_after_the_stream(
    spans: tuple[Tracing, InMemorySpanExporter],
) -> None:
    traced, exporter = spans
    trace = traced.start(request({}))
    trace.hold()  # a request scope is open

    async def body():  # type: ignore[no-untyped-def]
        yield b"data: 1\n\n"

    streamed = trace.finish(StreamingResponse(body()))

    async def sent() -> list[bytes]:
        return [c async for c in streamed.body_iterator]

    asyncio.run(sent())
    assert exporter.get_finished_spans() == ()  # the scope has not settled yet
    trace.usage({"prompt_tokens": 3, "completion_tokens": 1})
    trace.release()
    (span,) = exporter.get_finished_spans()
    assert span.attributes["gen_ai.usage.input_tokens"] == 3
    trace.release()  # a second settle ends nothing more
    assert len(exporter.get_finished_spans()) == 1


@pytest.mark.parametrize("held", [False, True])
def test_a_cancelled_request_ends_its_span_as_499(
    spans: tuple[Tracing, InMemorySpanExporter], held: bool
) -> None:
    traced, exporter = spans
    trace = traced.start(request({}))
    if held:
        trace.hold()
    trace.abandon()
    if held:
        assert exporter.get_finished_spans() == ()
        trace.release()  # the scope settles as the cancellation unwinds
    (span,) = exporter.get_finished_spans()
    assert span.attributes["http.response.status_code"] == 499
