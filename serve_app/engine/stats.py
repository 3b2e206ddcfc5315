"""The engine's load, read from its Prometheus `/metrics` text: TGI's gauges (and the local
engine's, which are TGI's) or vLLM's, whichever the text holds."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class EngineLoad:
    queued: float  # admitted, waiting for a batch slot
    running: float  # in the running batch
    kv_pressure: float = 0.0  # the fraction of the KV cache in use (0 if unknown)


# TGI: the queue, the running batch, and the KV cache as tokens held over tokens it can hold.
TGI_QUEUED, TGI_RUNNING = "tgi_queue_size", "tgi_batch_current_size"
KV_USED, KV_TOTAL = "tgi_batch_current_max_tokens", "tgi_batch_max_total_tokens"
# vLLM: the same two counts, and the KV cache's use as a fraction (1 is full, whatever the name).
VLLM_QUEUED, VLLM_RUNNING = "vllm:num_requests_waiting", "vllm:num_requests_running"
VLLM_KV = "vllm:kv_cache_usage_perc"
READ = frozenset({TGI_QUEUED, TGI_RUNNING, KV_USED, KV_TOTAL, VLLM_QUEUED, VLLM_RUNNING, VLLM_KV})


def parse_load(text: str) -> EngineLoad:
    """The load in `text`. Counts are summed over their labels (vLLM labels every gauge with
    its model and engine index); vLLM's KV use is the fullest engine's."""
    sums: dict[str, float] = {}
    kv_fractions: list[float] = []
    for family in text_string_to_metric_families(text):
        if family.name not in READ:
            continue
        values = [sample.value for sample in family.samples]
        sums[family.name] = sums.get(family.name, 0.0) + sum(values)
        if family.name == VLLM_KV:
            kv_fractions += values
    queued = sums.get(TGI_QUEUED, 0.0) + sums.get(VLLM_QUEUED, 0.0)
    running = sums.get(TGI_RUNNING, 0.0) + sums.get(VLLM_RUNNING, 0.0)
    if kv_fractions:
        kv = max(kv_fractions)
    else:
        total = sums.get(KV_TOTAL, 0.0)
        kv = sums.get(KV_USED, 0.0) / total if total > 0 else 0.0
    return EngineLoad(queued, running, min(1.0, max(0.0, kv)))
