"""The load generator's arithmetic: token arrival times and what a measured window counts."""

from bench.loadgen import Result, Sample, summary


def sample(started_at: float, ttft_s: float, itl_s: tuple[float, ...], ok: bool = True) -> Sample:
    e2e = ttft_s + sum(itl_s)
    return Sample(ttft_s, itl_s, e2e, len(itl_s) + 1 if ok else 0, ok, 200 if ok else 0,
                  started_at)  # fmt: skip


def test_token_times_follow_the_first_token_and_the_gaps() -> None:
    assert sample(100.0, 0.5, (0.25, 0.25)).token_times() == [100.5, 100.75, 101.0]
    assert sample(100.0, 0.5, (), ok=False).token_times() == []


def test_a_window_counts_only_what_happened_inside_it() -> None:
    before = sample(9.0, 0.5, (0.5, 0.5, 0.5))  # tokens at 9.5, 10.0, 10.5, 11.0
    inside = sample(10.2, 0.1, (0.2,))  # tokens at 10.3, 10.5; finished inside
    late = sample(11.8, 0.1, (0.2, 0.2))  # tokens at 11.9, 12.1, 12.3; finished after
    result = Result([before, inside, late], elapsed_s=2.0, window=(10.0, 12.0))
    stats = summary(result, slo_ttft_s=0.2)
    assert stats["requests"] == 2  # started inside: `inside` and `late`
    assert stats["ttft_p50_ms"] == 100.0
    assert stats["tokens_per_s"] == (3 + 2 + 1) / 2.0  # before: 10.0, 10.5, 11.0
    # finished inside the window: `before` (at 11.0, TTFT over the SLO) and `inside`
    assert stats["requests_per_s"] == 2 / 2.0
    assert stats["goodput_per_s"] == 1 / 2.0


def test_without_a_window_every_request_counts_over_the_whole_run() -> None:
    result = Result([sample(0.0, 0.1, (0.1,)), sample(5.0, 0.3, (0.1,))], elapsed_s=4.0)
    stats = summary(result, slo_ttft_s=0.2)
    assert stats["requests"] == 2
    assert stats["tokens_per_s"] == 4 / 4.0
    assert stats["goodput_per_s"] == 1 / 4.0


def test_failed_requests_are_counted_as_errors_not_latencies() -> None:
    result = Result([sample(10.5, 0.1, (0.1,)), sample(10.6, 0.0, (), ok=False)], 1.0,
                    window=(10.0, 11.0))  # fmt: skip
    stats = summary(result, slo_ttft_s=0.2)
    assert stats["errors"] == 1 and stats["requests"] == 2
    assert stats["tokens_per_s"] == 2.0
