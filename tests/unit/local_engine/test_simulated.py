"""The simulated engine's timetable: token times and finish reasons."""

from __future__ import annotations

import asyncio

from serve_app.local_engine.backend import Finished, GeneratedToken
from serve_app.local_engine.simulated import SimulatedBackend, Timetable
from serve_app.local_engine.validation import Sampling


def sampling(max_new_tokens: int, top_n_tokens: int = 0) -> Sampling:
    return Sampling(
        max_new_tokens=max_new_tokens, temperature=0, top_p=1, top_k=0, typical_p=1,
        repetition_penalty=1, frequency_penalty=0, seed=None, stop=(), top_n_tokens=top_n_tokens,
    )  # fmt: skip


async def timed(backend: SimulatedBackend, s: Sampling) -> tuple[float, list[tuple[float, object]]]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    return start, [(loop.time() - start, e) async for e in backend.generate("hi", s)]


def test_tokens_follow_the_timetable_and_are_never_early() -> None:
    table = Timetable(ttft_s=0.03, itl_s=0.01, output_tokens=5)
    _, events = asyncio.run(timed(SimulatedBackend(table, slots=4), sampling(100)))
    *tokens, (_, end) = events
    assert [e.token.text for _, e in tokens] == [" w0", " w1", " w2", " w3", " w4"]  # type: ignore[attr-defined]
    assert end == Finished("eos_token", 5, 0)
    for i, (at, _) in enumerate(tokens):
        due = table.ttft_s + i * table.itl_s
        assert due - 1e-3 <= at < due + 0.05, (i, at, due)


def test_max_new_tokens_ends_with_length_and_top_tokens_when_asked() -> None:
    table = Timetable(ttft_s=0.0, itl_s=0.001, output_tokens=64)
    _, events = asyncio.run(timed(SimulatedBackend(table, slots=4), sampling(3, top_n_tokens=1)))
    tokens = [e for _, e in events if isinstance(e, GeneratedToken)]
    assert len(tokens) == 3 and all(t.top_tokens == (t.token,) for t in tokens)
    assert events[-1][1] == Finished("length", 3, 0)


def test_many_streams_keep_their_own_times() -> None:
    table = Timetable(ttft_s=0.02, itl_s=0.005, output_tokens=8)
    backend = SimulatedBackend(table, slots=64)

    async def many() -> list[float]:
        runs = await asyncio.gather(*(timed(backend, sampling(100)) for _ in range(64)))
        return [events[-2][0] for _, events in runs]  # the last token's time

    last = asyncio.run(many())
    due = table.ttft_s + 7 * table.itl_s
    assert all(due - 1e-3 <= t < due + 0.25 for t in last), (min(last), max(last))


def test_a_failure_rate_fails_that_share_of_generations_with_a_500() -> None:
    from serve_app.local_engine.validation import EngineError

    table = Timetable(ttft_s=0.0, itl_s=0.0, output_tokens=2)
    draws = iter([0.1, 0.9])
    backend = SimulatedBackend(table, slots=1, failure_rate=0.5, draw=lambda: next(draws))
    try:
        asyncio.run(timed(backend, sampling(2)))
    except EngineError as exc:
        assert exc.status == 500
    else:
        raise AssertionError("the first generation should have failed")
    _, events = asyncio.run(timed(backend, sampling(2)))
    assert isinstance(events[-1][1], Finished)
