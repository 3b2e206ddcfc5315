from __future__ import annotations

from serve_app.compare.eval_set import Case
from serve_app.compare.report import (
    agreement,
    build,
    contains,
    markdown,
    percentile,
    similarity,
    summarize,
)
from serve_app.compare.runner import Sample, TargetRun

CASES = [
    Case("fr", ({"role": "user", "content": "Capital of France?"},), "Paris"),
    Case("add", ({"role": "user", "content": "2+2?"},), "4"),
    Case("story", ({"role": "user", "content": "A story."},)),
]


def sample(target: str, case_id: str, text: str, **kw: object) -> Sample:
    return Sample(target, case_id, text=text, **kw)  # type: ignore[arg-type]


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0


def test_contains_is_whole_words_and_similarity_is_normalized() -> None:
    assert contains("The capital of France is Paris.", "Paris")
    assert not contains("Parisian food", "Paris")
    assert contains("It is 4.", "4") and not contains("It is 44.", "4")
    assert similarity("Paris.", "paris") == 1.0
    assert 0 < similarity("Paris is big", "Paris") < 1


def test_a_targets_figures() -> None:
    run = TargetRun(
        "small",
        [
            sample("small", "fr", "Paris.", ttft_s=0.1, gaps_s=[0.01, 0.03], completion_tokens=3,
                   prompt_tokens=10),
            sample("small", "add", "It is 5", ttft_s=0.3, gaps_s=[0.02], completion_tokens=4,
                   prompt_tokens=8),
            sample("small", "story", "", error="503: busy"),
        ],
        wall_s=2.0,
    )  # fmt: skip
    figures = summarize(run, CASES)
    assert figures["requests"] == 3 and figures["errors"] == 1
    assert figures["requests_per_s"] == 1.0
    assert figures["output_tokens_per_s"] == 3.5
    assert figures["ttft_ms"] == {"p50": 100.0, "p99": 300.0}
    assert figures["itl_ms"] == {"p50": 20.0, "p99": 30.0}
    assert (figures["prompt_tokens"], figures["completion_tokens"]) == (18, 7)
    assert figures["graded"] == 2
    assert figures["exact_match"] == 0.5
    assert figures["contains_expected"] == 0.5
    assert figures["error_examples"] == ["503: busy"]


def test_agreement_counts_cases_both_answered() -> None:
    first = TargetRun("a", [sample("a", "fr", "Paris"), sample("a", "add", "4"),
                            sample("a", "story", "", error="x")], 1.0)  # fmt: skip
    second = TargetRun("b", [sample("b", "fr", "paris."), sample("b", "add", "5"),
                             sample("b", "story", "Once")], 1.0)  # fmt: skip
    agreed = agreement(first, second)
    assert agreed["compared"] == 2
    assert agreed["same_answer"] == 0.5
    assert agreed["targets"] == ["a", "b"]


def test_the_result_and_its_table() -> None:
    runs = [
        TargetRun("a", [sample("a", c.id, "Paris", ttft_s=0.2) for c in CASES], 1.0),
        TargetRun("b", [sample("b", c.id, "4", ttft_s=0.1) for c in CASES], 1.0),
    ]
    result = build(runs, CASES, {"eval": "x.jsonl", "concurrency": 2})
    assert result["cases"] == 3 and result["eval"] == "x.jsonl"
    assert [t["target"] for t in result["targets"]] == ["a", "b"]
    assert result["answers"][0] == {"id": "fr", "expected": "Paris", "a": "Paris", "b": "4"}
    table = markdown(result)
    assert table.splitlines()[0] == "| | `a` | `b` |"
    assert "| exact match | 50 % | 50 % |" in table
    assert "| TTFT p50 / p99 (ms) | 200.0 / 200.0 | 100.0 / 100.0 |" in table
    assert "agree on 0 % of 3 answers" in table
