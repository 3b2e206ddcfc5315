"""The local engine's scheduler: its /metrics text (TGI's names and types, still readable by
the autoscaler's parser) and where a stop sequence ends an answer."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve_app.engine.stats import parse_load
from serve_app.local_engine.scheduler import EngineMetrics, exposition, stop_matched

# TGI 3.3's router metrics that a CPU engine can honour, with their types
TGI_METRICS = [
    ("tgi_request_count", "counter"),
    ("tgi_request_success", "counter"),
    ("tgi_request_failure", "counter"),
    ("tgi_queue_size", "gauge"),
    ("tgi_batch_current_size", "gauge"),
    ("tgi_batch_max_total_tokens", "gauge"),
    ("tgi_request_duration", "histogram"),
    ("tgi_request_validation_duration", "histogram"),
    ("tgi_request_queue_duration", "histogram"),
    ("tgi_request_inference_duration", "histogram"),
    ("tgi_request_mean_time_per_token_duration", "histogram"),
    ("tgi_request_input_length", "histogram"),
    ("tgi_request_generated_tokens", "histogram"),
    ("tgi_request_max_new_tokens", "histogram"),
]


@pytest.fixture
def text() -> str:
    metrics = EngineMetrics(max_batch_total_tokens=4096)
    metrics.request_count.inc(3)
    metrics.request_success.inc(2)
    metrics.request_failure.labels(err="validation").inc()
    metrics.queue_size.set(1)
    metrics.batch_current_size.set(2)
    metrics.request_duration.observe(0.3)
    return exposition(metrics.registry).decode()


@pytest.mark.parametrize(("name", "kind"), TGI_METRICS)
def test_tgis_name_and_type(text: str, name: str, kind: str) -> None:
    assert f"# TYPE {name} {kind}\n" in text


@pytest.mark.parametrize(
    ("sample", "value"),
    [
        ("tgi_request_count", 3.0),
        ("tgi_request_success", 2.0),
        ('tgi_request_failure{err="validation"}', 1.0),
        ("tgi_batch_max_total_tokens", 4096.0),
        ("tgi_request_duration_count", 1.0),
    ],
)
def test_samples_under_tgis_names(text: str, sample: str, value: float) -> None:
    assert f"\n{sample} {value}\n" in text


def test_no_prometheus_client_suffixes(text: str) -> None:
    names = {line.split(" ")[0].split("{")[0] for line in text.splitlines() if line[0] != "#"}
    assert not [n for n in names if n.endswith(("_total", "_created"))]


def test_the_autoscalers_parser_reads_it(text: str) -> None:
    assert parse_load(text).queued == 1.0 and parse_load(text).running == 2.0
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {name for name, _ in TGI_METRICS} <= names


@pytest.mark.parametrize(
    ("recent", "stop", "matched"),
    [
        ("1, 2, 3", ("3",), True),
        ("1, 2, 3", (" 3",), True),
        ("1, 2, 3,", ("3",), False),  # TGI matches only at the end of the text so far
        ("Hello world", ("lo w", "xyz"), False),
        ("Hello world", ("xyz", "world"), True),
        ("anything", ("",), False),
    ],
)
def test_stop_sequences_match_the_end_of_the_text(
    recent: str, stop: tuple[str, ...], matched: bool
) -> None:
    assert stop_matched(recent, stop) == matched
