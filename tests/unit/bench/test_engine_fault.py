"""The engine-fault benchmark's report (`bench/engine_fault.outcome`), a pure function."""

from __future__ import annotations

from bench.engine_fault import outcome
from bench.loadgen import Result, Sample

KILLED_AT = 1000.0


def sample(started: float, status: int) -> Sample:
    ok = status == 200
    return Sample(0.02, (), 0.2, 16 if ok else 0, ok, status, KILLED_AT + started,
                  "" if ok else '{"error":"engine unreachable"}')  # fmt: skip


def test_statuses_by_second_after_the_kill_and_the_failures_span() -> None:
    result = Result([sample(-0.5, 200), sample(0.2, 503), sample(1.5, 503), sample(1.7, 200),
                     sample(3.0, 0)], 5.0)  # fmt: skip
    report = outcome(result, KILLED_AT, KILLED_AT + 4.0)
    assert report["requests"] == 5 and report["failed"] == 3
    assert report["failed_by_status"] == {503: 2, 0: 1}
    assert report["last_failure_after_kill_s"] == 3.0
    assert report["all_engines_back_after_kill_s"] == 4.0
    assert report["statuses_by_second_after_kill"] == {
        "-1": {200: 1},
        "0": {503: 1},
        "1": {503: 1, 200: 1},
        "3": {0: 1},
    }
    assert report["failure_examples"] == ['{"error":"engine unreachable"}']


def test_no_failure_and_no_replacement_seen() -> None:
    report = outcome(Result([sample(0.1, 200)], 1.0), KILLED_AT, None)
    assert report["failed"] == 0 and report["last_failure_after_kill_s"] is None
    assert report["all_engines_back_after_kill_s"] is None
