"""The local engine's answer headers, in TGI's names and units."""

from __future__ import annotations

from serve_app.local_engine.headers import answer_headers, stream_headers
from serve_app.local_engine.scheduler import Timing


def test_answer_headers_in_tgis_units() -> None:
    timing = Timing(queued=10.0045, started=10.5, done=12.5)
    headers = answer_headers("cpu", 42, 10.0, timing, prompt_tokens=7, generated_tokens=4)
    assert headers == {
        "x-compute-type": "cpu",
        "x-compute-characters": "42",
        "x-total-time": "2500",
        "x-validation-time": "4",
        "x-queue-time": "495",  # whole milliseconds, cut as Rust's as_millis does
        "x-inference-time": "2000",
        "x-time-per-token": "500",
        "x-prompt-tokens": "7",
        "x-generated-tokens": "4",
        "x-compute-time": "2.5",
    }
    without = answer_headers("cpu", 1, 10.0, timing, 1, 0, compute_time=False)
    assert "x-compute-time" not in without and without["x-time-per-token"] == "0"
    assert stream_headers("cpu", 3) == {
        "x-compute-type": "cpu", "x-compute-characters": "3", "x-accel-buffering": "no"
    }  # fmt: skip
