"""The comparison as a PNG: latency (TTFT and inter-token p50/p99) and quality, per target."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def write(result: Mapping[str, Any], path: Path) -> bool:
    """False (nothing written) without matplotlib: install the `bench` extra for the plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    targets = result["targets"]
    names = [t["target"] for t in targets]
    fig, (latency, quality) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(names), 1)
    groups = ["TTFT p50", "TTFT p99", "ITL p50", "ITL p99"]
    for i, t in enumerate(targets):
        values = [t["ttft_ms"]["p50"], t["ttft_ms"]["p99"], t["itl_ms"]["p50"], t["itl_ms"]["p99"]]
        latency.bar(
            [g + i * width for g in range(len(groups))],
            [v or 0 for v in values],
            width,
            label=t["target"],
        )
        scores = [t["exact_match"], t["contains_expected"], t["similarity"]]
        quality.bar(
            [g + i * width for g in range(3)], [v or 0 for v in scores], width, label=t["target"]
        )
    latency.set_xticks([g + width * (len(names) - 1) / 2 for g in range(len(groups))], groups)
    latency.set_ylabel("ms")
    latency.set_title("latency")
    latency.legend()
    quality.set_xticks(
        [g + width * (len(names) - 1) / 2 for g in range(3)], ["exact", "contains", "similarity"]
    )
    quality.set_ylim(0, 1)
    quality.set_title("quality against the expected answers")
    title = result.get("eval", "eval set")
    fig.suptitle(f"{title}: {result['cases']} cases, concurrency {result.get('concurrency')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
