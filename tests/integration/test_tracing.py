"""One request, one trace: router → tier replica → engine, received by a real OTLP receiver.

The stack runs with `tracing` configured and `sample_ratio: 0`: only requests that arrive with
a sampled W3C `traceparent` are traced, so each trace here is the test's own.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import httpx
import pytest
import yaml

from tests.helpers import wait_for
from tests.otlp import ReceivedSpan, Receiver

from .conftest import Stack, local_config, start_engine

KEY = "sk-traced-0123456789abcdef"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
SERVER = 2  # OTLP's SPAN_KIND_SERVER


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stack(ray_head: Stack, receiver: Receiver, tmp_path_factory: pytest.TempPathFactory) -> Stack:
    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text(yaml.safe_dump([{"name": "team-traced", "key": KEY}]))
    config = local_config()
    args = config["applications"][0]["args"]
    args["router"]["api_keys"] = {"file": str(keys)}
    args["tracing"] = {
        "otlp_endpoint": receiver.endpoint,
        "service_name": "serve-app-test",
        "sample_ratio": 0.0,
    }
    ray_head.deploy(config)
    return ray_head


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def collected(receiver: Receiver, trace_id: str, count: int) -> list[ReceivedSpan]:
    """The trace's spans once `count` have arrived (spans leave each process within ~1 s)."""
    wait_for(lambda: len(receiver.trace(trace_id)) >= count, 30, f"{count} spans of {trace_id}")
    time.sleep(2)  # and nothing more than expected arrives
    return receiver.trace(trace_id)


def by_parent(spans: list[ReceivedSpan], parent: str) -> ReceivedSpan:
    children = [s for s in spans if s.parent_span_id == parent]
    assert len(children) == 1, (parent, spans)
    return children[0]


def test_streamed_chat_is_one_trace_from_router_to_engine(stack: Stack, receiver: Receiver) -> None:
    header, trace_id, caller_span = traceparent()
    body = {"model": "gpt-4o-mini", "messages": QUESTION, "max_tokens": 8, "stream": True}
    body["stream_options"] = {"include_usage": True}
    headers = {"authorization": f"Bearer {KEY}", "traceparent": header}
    with httpx.stream(
        "POST", f"{stack.url}/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as reply:
        assert reply.status_code == 200
        events = [line for line in reply.iter_lines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]" and len(events) > 2

    spans = collected(receiver, trace_id, 3)
    assert len(spans) == 3, spans
    router = by_parent(spans, caller_span)
    tier = by_parent(spans, router.span_id)
    engine = by_parent(spans, tier.span_id)
    assert len({s.pid for s in spans}) == 3  # three processes: router, replica, engine

    assert router.name == "POST /v1/chat/completions" and router.kind == SERVER
    assert router.service == "serve-app-test"
    assert router.attributes == router.attributes | {
        "tier": "small",
        "tenant": "team-traced",
        "model_id": "smollm2-135m-instruct",
        "inference.backend": "local",
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.request.max_tokens": 8,
        "gen_ai.response.model": "smollm2-135m-instruct",
        "http.response.status_code": 200,
        "serve_app.tier_reason": "alias gpt-4o-mini",
    }
    assert router.attributes["gen_ai.usage.input_tokens"] > 0
    assert 0 < router.attributes["gen_ai.usage.output_tokens"] <= 8
    assert router.events[:3] == ("admitted", "replica_taken", "first_token")
    assert KEY not in repr(spans)

    assert tier.name == "tier /v1/chat/completions" and tier.service == "serve-app-test"
    assert tier.attributes == tier.attributes | {
        "tier": "small",
        "tenant": "team-traced",
        "model_id": "smollm2-135m-instruct",
        "inference.backend": "local",
        "serve_app.data_path": "direct",
    }
    # The replica leased its engine and the chunks went engine -> router: the tier's span
    # covers the lease, the engine's span (its child) the generation.
    assert "first_token" not in tier.events

    assert engine.name == "chat_completions" and engine.kind == SERVER
    assert engine.service == "serve-app-test-engine"
    assert engine.attributes["model_id"] == "smollm2-135m-instruct"
    assert engine.attributes["http.response.status_code"] == 200
    assert engine.attributes["serve_app.stream_events"] > 2
    assert "first_token" in engine.events


def test_tgi_route_is_traced_through_the_tier_too(stack: Stack, receiver: Receiver) -> None:
    header, trace_id, caller_span = traceparent()
    reply = httpx.post(
        f"{stack.url}/generate",
        json={"inputs": "The capital of France is", "parameters": {"max_new_tokens": 3}},
        headers={"authorization": f"Bearer {KEY}", "traceparent": header, "x-tier": "large"},
        timeout=60,
    )
    assert reply.status_code == 200
    spans = collected(receiver, trace_id, 3)
    router = by_parent(spans, caller_span)
    tier = by_parent(spans, router.span_id)
    engine = by_parent(spans, tier.span_id)
    assert router.attributes["tier"] == tier.attributes["tier"] == "large"
    assert router.attributes["gen_ai.request.max_tokens"] == 3
    assert engine.name == "generate"


def test_without_a_sampled_traceparent_nothing_is_recorded(
    stack: Stack, receiver: Receiver
) -> None:
    """sample_ratio 0: new traces are not sampled, and a caller's "not sampled" is followed."""
    before = len(receiver.all())
    header, trace_id, _ = traceparent()
    for headers in ({}, {"traceparent": header[:-2] + "00"}):
        reply = httpx.post(
            f"{stack.url}/v1/chat/completions",
            json={"model": "small", "messages": QUESTION, "max_tokens": 2},
            headers={"authorization": f"Bearer {KEY}", **headers},
            timeout=60,
        )
        assert reply.status_code == 200
    time.sleep(3)
    assert len(receiver.all()) == before and not receiver.trace(trace_id)


def test_local_engine_continues_the_callers_trace_as_tgi_does(
    receiver: Receiver, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The engine alone, started with the launcher's flags: its span is the caller's child."""
    log = tmp_path_factory.mktemp("traced-engine") / "engine.log"
    engine = start_engine(
        log,
        "--model-id", "simulated", "--sim-output-tokens", "4",
        "--otlp-endpoint", receiver.endpoint, "--otlp-service-name", "engine-alone",
    )  # fmt: skip
    try:
        header, trace_id, caller_span = traceparent()
        reply = httpx.post(
            f"{engine.url}/generate_stream",
            json={"inputs": "Hello", "parameters": {"max_new_tokens": 4}},
            headers={"traceparent": header},
            timeout=30,
        )
        assert reply.status_code == 200 and reply.text.count("data:") == 4
        assert httpx.get(f"{engine.url}/health", timeout=5).status_code == 200
        (span,) = collected(receiver, trace_id, 1)
    finally:
        engine.process.terminate()
        engine.process.wait(timeout=30)
    assert span.parent_span_id == caller_span and span.name == "generate_stream"
    assert span.kind == SERVER and span.service == "engine-alone"
    assert span.pid == engine.process.pid
    assert span.attributes == span.attributes | {
        "model_id": "simulated",
        "inference.backend": "local",
        "http.response.status_code": 200,
        "serve_app.stream_events": 4,
    }
    assert span.events == ("first_token",)
    assert not [s for s in receiver.all() if s.service == "engine-alone" and s.trace_id != trace_id]
