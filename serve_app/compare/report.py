"""Figures from the runner's samples (pure): per target, and the agreement of two targets."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from difflib import SequenceMatcher
from typing import Any

from .eval_set import Case, normalize
from .runner import Sample, TargetRun


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (`q` in 0..100); None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def similarity(a: str, b: str) -> float:
    """0..1: how much of two normalized texts matches (difflib's ratio)."""
    return SequenceMatcher(None, normalize(a), normalize(b), autojunk=False).ratio()


def contains(answer: str, expected: str) -> bool:
    """The expected answer appears in the answer as whole words (after `normalize`)."""
    want = normalize(expected)
    return bool(want) and f" {want} " in f" {_words(answer)} "


def _words(text: str) -> str:
    return " ".join("".join(c if c.isalnum() else " " for c in normalize(text)).split())


def summarize(run: TargetRun, cases: Sequence[Case]) -> dict[str, Any]:
    expected = {case.id: case.expected for case in cases if case.expected is not None}
    ok = [s for s in run.samples if s.error is None]
    ttfts = [s.ttft_s for s in ok if s.ttft_s is not None]
    gaps = [gap for s in ok for gap in s.gaps_s]
    completion = sum(s.completion_tokens for s in ok)
    graded = [s for s in ok if s.case_id in expected]
    return {
        "target": run.target,
        "requests": len(run.samples),
        "errors": len(run.samples) - len(ok),
        "wall_s": round(run.wall_s, 3),
        "requests_per_s": _rate(len(ok), run.wall_s),
        "output_tokens_per_s": _rate(completion, run.wall_s),
        "ttft_ms": {"p50": _ms(percentile(ttfts, 50)), "p99": _ms(percentile(ttfts, 99))},
        "itl_ms": {"p50": _ms(percentile(gaps, 50)), "p99": _ms(percentile(gaps, 99))},
        "prompt_tokens": sum(s.prompt_tokens for s in ok),
        "completion_tokens": completion,
        "graded": len(graded),
        "exact_match": _share(normalize(s.text) == normalize(expected[s.case_id]) for s in graded),
        "contains_expected": _share(contains(s.text, expected[s.case_id]) for s in graded),
        "similarity": _mean(similarity(s.text, expected[s.case_id]) for s in graded),
        "error_examples": sorted({s.error for s in run.samples if s.error})[:5],
    }


def agreement(first: TargetRun, second: TargetRun) -> dict[str, Any]:
    """How often two targets gave the same answer to a case both answered."""
    answers = {s.case_id: s for s in first.samples if s.error is None}
    pairs = [
        (answers[s.case_id], s) for s in second.samples if s.error is None and s.case_id in answers
    ]
    return {
        "targets": [first.target, second.target],
        "compared": len(pairs),
        "same_answer": _share(normalize(a.text) == normalize(b.text) for a, b in pairs),
        "similarity": _mean(similarity(a.text, b.text) for a, b in pairs),
    }


def build(runs: Sequence[TargetRun], cases: Sequence[Case], meta: Mapping[str, Any]) -> dict:
    result: dict[str, Any] = {
        **meta,
        "cases": len(cases),
        "targets": [summarize(run, cases) for run in runs],
    }
    if len(runs) >= 2:
        result["agreement"] = agreement(runs[0], runs[1])
    result["answers"] = [
        {"id": case.id, "expected": case.expected, **_answers(runs, case.id)} for case in cases
    ]
    return result


def _answers(runs: Sequence[TargetRun], case_id: str) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for run in runs:
        sample: Sample | None = next((s for s in run.samples if s.case_id == case_id), None)
        found[run.target] = None if sample is None or sample.error else sample.text
    return found


ROWS = [
    ("requests (errors)", lambda t: f"{t['requests']} ({t['errors']})"),
    ("requests/s", lambda t: _fmt(t["requests_per_s"])),
    ("output tokens/s", lambda t: _fmt(t["output_tokens_per_s"])),
    ("TTFT p50 / p99 (ms)", lambda t: _pair(t["ttft_ms"])),
    ("inter-token p50 / p99 (ms)", lambda t: _pair(t["itl_ms"])),
    ("prompt / completion tokens", lambda t: f"{t['prompt_tokens']} / {t['completion_tokens']}"),
    ("exact match", lambda t: _pct(t["exact_match"])),
    ("contains the expected answer", lambda t: _pct(t["contains_expected"])),
    ("similarity to expected (0-1)", lambda t: _fmt(t["similarity"], 2)),
]  # fmt: skip


def markdown(result: Mapping[str, Any]) -> str:
    targets = result["targets"]
    lines = [
        "| | " + " | ".join(f"`{t['target']}`" for t in targets) + " |",
        "| --- |" + " --- |" * len(targets),
    ]
    lines += [f"| {name} | " + " | ".join(cell(t) for t in targets) + " |" for name, cell in ROWS]
    agreed = result.get("agreement")
    if agreed:
        lines.append(
            f"\nThe two agree on {_pct(agreed['same_answer'])} of {agreed['compared']} answers "
            f"(exact after normalizing); mean similarity {_fmt(agreed['similarity'], 2)}."
        )
    return "\n".join(lines) + "\n"


def _rate(count: float, seconds: float) -> float | None:
    return round(count / seconds, 2) if seconds > 0 else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _share(flags: Any) -> float | None:
    values = list(flags)
    return round(sum(values) / len(values), 3) if values else None


def _mean(values: Any) -> float | None:
    items = list(values)
    return round(sum(items) / len(items), 3) if items else None


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _pair(figures: Mapping[str, float | None]) -> str:
    return f"{_fmt(figures['p50'])} / {_fmt(figures['p99'])}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.0f} %"
