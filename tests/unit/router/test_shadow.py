"""Shadow copies (`serve_app.router.shadow`): the comparison of two answers, the texts of whole
and streamed answers, the bound on copies in flight; and through the router alone, a copy that
reaches the candidate, is compared, and is never billed nor waited for."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from serve_app.config import AppConfig
from serve_app.engine.client import EngineReply
from serve_app.errors import TierUnavailable
from serve_app.router.shadow import (
    MAX_IN_FLIGHT,
    Comparison,
    Outcome,
    Shadows,
    answer_text,
    compare,
    similarity,
    sse_text,
)
from serve_app.router.versions import Versions

from .router_kit import CHAT, ListRecorder, bearer, call, config, engine, router


def test_alike_texts_are_near_one_and_unlike_ones_low() -> None:
    assert similarity("Paris is the capital.", "Paris  is the capital.") == 1.0
    assert similarity("Paris", "Berlin, surely") < 0.5
    assert similarity("", "") == 1.0


def test_a_comparison_of_two_answers() -> None:
    stable = Outcome(200, 2.0, 10, "Paris")
    got = compare(stable, Outcome(200, 1.0, 5, "Paris"))
    assert got == Comparison("ok", 0.5, 0.5, 1.0)
    assert compare(stable, Outcome(500, 0.1, None, None)).result == "error"
    assert compare(None, Outcome(200, 1.0, 5, "x")) == Comparison("ok")
    assert compare(Outcome(499, 1.0, 0, None), Outcome(200, 1.0, 5, "x")) == Comparison("ok")


def test_the_text_of_whole_answers() -> None:
    assert answer_text({"choices": [{"message": {"content": "hi"}}]}) == "hi"
    assert answer_text({"choices": [{"text": "yo"}]}) == "yo"
    assert answer_text({"generated_text": "tgi"}) == "tgi"
    assert answer_text([{"generated_text": "list"}]) == "list"
    assert answer_text("nope") is None


def test_the_text_of_streamed_answers() -> None:
    chunks = [
        {"choices": [{"delta": {"content": "Pa"}}]},
        {"choices": [{"delta": {"content": "ris"}}]},
    ]
    body = (
        b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    )
    assert sse_text(body) == "Paris"
    tgi = [{"token": {"text": "a", "special": False}}, {"token": {"text": "b"}},
           {"token": {"text": "</s>", "special": True}, "generated_text": "ab"}]  # fmt: skip
    assert sse_text(b"".join(b"data:" + json.dumps(e).encode() + b"\n\n" for e in tgi)) == "ab"


def versions_for_shadow() -> Versions:
    return Versions(AppConfig.model_validate({"tiers": [{"name": "small", "candidate": {
        "version": "v2", "shadow_percent": 100}}]}))  # fmt: skip


def test_copies_beyond_the_bound_are_dropped_and_counted() -> None:
    recorder, versions = ListRecorder(), versions_for_shadow()
    target = versions.target("small@v2")
    release = None

    async def run() -> None:
        nonlocal release
        release = asyncio.Event()

        async def send(key: str, c: Any) -> EngineReply:
            await release.wait()
            return EngineReply(200, b'{"choices": [{"text": "x"}]}', {})

        shadows = Shadows(recorder, set())
        copies = [shadows.start(target, None, send, versions, 5) for _ in range(MAX_IN_FLIGHT + 2)]  # type: ignore[arg-type]
        assert sum(c is None for c in copies) == 2
        assert shadows.in_flight("small@v2") == MAX_IN_FLIGHT
        release.set()
        for c in copies:
            if c is not None:
                c.settled(Outcome(200, 1.0, 1, "x"))
        await asyncio.sleep(0.05)
        assert shadows.in_flight("small@v2") == 0

    asyncio.run(run())
    results = [c.result for _, _, c in recorder.shadows]
    assert results.count("dropped") == 2 and results.count("ok") == MAX_IN_FLIGHT


def test_failing_copies_roll_the_candidate_back() -> None:
    recorder, versions = ListRecorder(), versions_for_shadow()
    target = versions.target("small@v2")

    async def send(key: str, c: Any) -> EngineReply:
        return EngineReply(500, b'{"error": "boom"}', {})

    async def run() -> None:
        shadows = Shadows(recorder, set())
        for _ in range(20):
            copy = shadows.start(target, None, send, versions, 5)  # type: ignore[arg-type]
            assert copy is not None
            copy.settled(None)
            await asyncio.sleep(0.01)

    asyncio.run(run())
    assert recorder.rollbacks == [("small", "v2", "error_rate")]
    assert versions.shadow(versions.stable("small")) is None


@pytest.mark.parametrize("stream", [False, True])
def test_a_shadowed_request_is_answered_by_stable_and_copied(tmp_path: Path, stream: bool) -> None:
    cfg = config(tmp_path).model_dump(mode="json", exclude_unset=True)
    cfg["tiers"][0]["candidate"] = {"version": "v2", "shadow_percent": 100}
    r, recorder, _ = router(AppConfig.model_validate(cfg), engine)

    async def run() -> Any:
        answer = await call(r.asgi_app(), "POST", "/v1/chat/completions",
                            {**CHAT, "stream": stream}, bearer("team-a"))  # fmt: skip
        for _ in range(100):
            if recorder.shadows:
                break
            await asyncio.sleep(0.02)
        return answer

    answer = asyncio.run(run())
    assert answer.status == 200 and answer.headers["x-served-version"] == "stable"
    (tier, version, comparison) = recorder.shadows[0]
    assert (tier, version, comparison.result) == ("small", "v2", "ok")
    assert comparison.similarity == 1.0  # the same engine answered both
    assert recorder.versions == ["stable"]  # the copy is not a request of the client's
    charged = recorder.tokens_by_tenant["team-a"]
    assert charged == recorder.outcomes[0][2].total  # the copy's tokens are not billed


def test_a_candidate_not_serving_yet_drops_its_copies_and_judges_nothing() -> None:
    recorder, versions = ListRecorder(), versions_for_shadow()
    target = versions.target("small@v2")

    async def send(key: str, c: Any) -> EngineReply:
        raise TierUnavailable("no replica of tier 'small@v2' took the request within 600s")

    async def run() -> None:
        shadows = Shadows(recorder, set())
        for _ in range(30):
            copy = shadows.start(target, None, send, versions, 5)  # type: ignore[arg-type]
            assert copy is not None
            copy.settled(None)
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        assert shadows.in_flight("small@v2") == 0

    asyncio.run(run())
    assert [c.result for _, _, c in recorder.shadows] == ["dropped"] * 30
    assert recorder.rollbacks == [] and versions.shadow(versions.stable("small")) is not None


def test_slow_whole_answers_of_copies_do_not_roll_the_candidate_back() -> None:
    versions = Versions(AppConfig.model_validate({"tiers": [{"name": "small", "candidate": {
        "version": "v2", "shadow_percent": 100, "rollback": {"min_requests": 5,
        "max_p99_s": 1.0}}}]}))  # fmt: skip
    recorder, target = ListRecorder(), versions.target("small@v2")

    async def send(key: str, c: Any) -> EngineReply:
        await asyncio.sleep(0.02)
        return EngineReply(200, b'{"choices": [{"text": "x"}]}', {})

    async def run() -> None:
        shadows = Shadows(recorder, set())
        for _ in range(MAX_IN_FLIGHT):
            copy = shadows.start(target, None, send, versions, 5)  # type: ignore[arg-type]
            assert copy is not None
            copy.settled(Outcome(200, 0.001, 1, "x"))  # the stable answer: far faster
        await asyncio.sleep(0.2)

    asyncio.run(run())
    health = versions.state()["tiers"]["small"]["candidate"]["health"]
    assert health["requests"] == MAX_IN_FLIGHT and health["p99_s"] is None
    assert recorder.rollbacks == []
