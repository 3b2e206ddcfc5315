"""TGI's response headers: what a request cost, in the units TGI's `server.rs` uses.

Durations are whole milliseconds, except `x-compute-time` (seconds, as a decimal). Streams only
get the headers known before the first token.
"""

from __future__ import annotations

from .scheduler import Timing


def stream_headers(compute_type: str, characters: int) -> dict[str, str]:
    return {
        "x-compute-type": compute_type,
        "x-compute-characters": str(characters),
        "x-accel-buffering": "no",
    }


def answer_headers(
    compute_type: str,
    characters: int,
    received: float,
    timing: Timing,
    prompt_tokens: int,
    generated_tokens: int,
    *,
    compute_time: bool = True,
) -> dict[str, str]:
    """Headers of a whole answer. `received` is when the request arrived, on the clock of
    `timing`. TGI's `/v1/completions` leaves out `x-compute-time` (`compute_time=False`)."""
    inference = timing.done - timing.started
    headers = {
        "x-compute-type": compute_type,
        "x-compute-characters": str(characters),
        "x-total-time": _ms(timing.done - received),
        "x-validation-time": _ms(timing.queued - received),
        "x-queue-time": _ms(timing.started - timing.queued),
        "x-inference-time": _ms(inference),
        "x-time-per-token": _ms(inference / generated_tokens if generated_tokens else 0.0),
        "x-prompt-tokens": str(prompt_tokens),
        "x-generated-tokens": str(generated_tokens),
    }
    if compute_time:
        headers["x-compute-time"] = repr(max(0.0, timing.done - received))
    return headers


def _ms(seconds: float) -> str:
    return str(int(max(0.0, seconds) * 1000))
