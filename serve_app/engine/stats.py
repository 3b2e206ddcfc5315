"""The engine's load, read from its Prometheus `/metrics` text."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class EngineLoad:
    queued: float  # tgi_queue_size: admitted, waiting for a batch slot
    running: float  # tgi_batch_current_size: in the running batch
    # tgi_batch_current_max_tokens / tgi_batch_max_total_tokens: KV cache in use (0 if unknown)
    kv_pressure: float = 0.0


KV_USED, KV_TOTAL = "tgi_batch_current_max_tokens", "tgi_batch_max_total_tokens"


def parse_load(text: str) -> EngineLoad:
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in ("tgi_queue_size", "tgi_batch_current_size", KV_USED, KV_TOTAL):
            values[family.name] = sum(sample.value for sample in family.samples)
    total = values.get(KV_TOTAL, 0.0)
    kv = min(1.0, values.get(KV_USED, 0.0) / total) if total > 0 else 0.0
    return EngineLoad(
        values.get("tgi_queue_size", 0.0), values.get("tgi_batch_current_size", 0.0), kv
    )
