"""Sending a call to a tier (`serve_app.router.dispatch.Dispatcher`): which failures are tried
once more, and that every attempt's call is cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from ray.exceptions import ActorDiedError, RayTaskError

from serve_app.engine.client import EngineReply
from serve_app.errors import EngineReplyError, EngineUnavailable, EngineUnreachable
from serve_app.router.dispatch import Dispatcher, unserved
from serve_app.tier.call import TierCall

CALL = TierCall("/v1/chat/completions", {"messages": []}, stream=True, max_tokens=8, prompt_chars=2)


class Attempt:
    """One tier call: taken (`None`; left out with `taken=False`), then its outcomes in order,
    each an item or an error."""

    def __init__(self, *outcomes: Any, taken: bool = True) -> None:
        self._outcomes: Iterator[Any] = iter([None, *outcomes] if taken else outcomes)
        self.cancelled = False

    async def __anext__(self) -> Any:
        outcome = next(self._outcomes, StopAsyncIteration())
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def cancel(self) -> None:
        self.cancelled = True


class Transport:
    def __init__(self, *attempts: Attempt) -> None:
        self.attempts = list(attempts)
        self.made: list[Attempt] = []

    def _next(self) -> Attempt:
        self.made.append(self.attempts.pop(0))
        return self.made[-1]

    def request(self, tier: str, call: TierCall) -> Attempt:
        return self._next()

    def stream(self, tier: str, call: TierCall) -> Attempt:
        return self._next()

    async def info(self, tier: str) -> dict[str, Any]:
        return {}

    async def report_queue(self, tier: str, router: str, queued: int) -> None:
        return None


def stream(transport: Transport) -> Any:
    return asyncio.run(Dispatcher(transport, lambda tier: 1.0).stream("small", CALL))[0]


def request(transport: Transport) -> EngineReply:
    return asyncio.run(Dispatcher(transport, lambda tier: 1.0).request("small", CALL))


DIED = ActorDiedError()
REFUSED = EngineUnreachable("engine http://10.0.0.5:8011 refused /v1/chat/completions")
BUSY = EngineReplyError(429, "Model is overloaded", "overloaded")


UNSERVED: list[Callable[[], Attempt]] = [
    lambda: Attempt(REFUSED),
    lambda: Attempt(DIED, taken=False),
    lambda: Attempt(BUSY),
]


@pytest.mark.parametrize("first", UNSERVED, ids=["refused", "died before taking it", "busy"])
def test_a_stream_nothing_served_is_tried_once_more(first: Callable[[], Attempt]) -> None:
    transport = Transport(first(), Attempt(["data"]))
    assert stream(transport) == ["data"]
    assert [a.cancelled for a in transport.made] == [True, False]  # the second is the answer's


@pytest.mark.parametrize("first", UNSERVED[:2], ids=["refused", "died before taking it"])
def test_a_whole_answer_nothing_served_is_tried_once_more(first: Callable[[], Attempt]) -> None:
    ok = EngineReply(200, b"{}", {})
    transport = Transport(first(), Attempt(ok))
    assert request(transport) is ok
    assert [a.cancelled for a in transport.made] == [True, True]


def test_a_replica_lost_after_taking_the_call_is_not_tried_again() -> None:
    """It may have started the engine call (the relay path): a second one could generate the
    same answer twice."""
    for call in (stream, request):
        transport = Transport(Attempt(DIED), Attempt(["never"]))
        with pytest.raises(ActorDiedError):
            call(transport)
        assert len(transport.made) == 1 and transport.made[0].cancelled


def test_a_second_refusal_is_the_answer() -> None:
    transport = Transport(Attempt(REFUSED), Attempt(REFUSED))
    with pytest.raises(EngineUnreachable):
        stream(transport)
    assert len(transport.made) == 2 and all(a.cancelled for a in transport.made)


@pytest.mark.parametrize(
    "failure",
    [EngineUnavailable("no answer in time"), EngineReplyError(422, "bad", "validation")],
    ids=["timeout", "422"],
)
def test_a_call_the_engine_may_have_served_is_not_tried_again(failure: BaseException) -> None:
    transport = Transport(Attempt(failure), Attempt(["never"]))
    with pytest.raises(type(failure)):
        stream(transport)
    assert len(transport.made) == 1 and transport.made[0].cancelled


def test_unserved_failures() -> None:
    assert unserved(REFUSED, True) and unserved(BUSY, True) and unserved(DIED, False)
    assert not unserved(DIED, True)
    # An error a replica raised is judged by what it wraps.
    wrapped = RayTaskError("lease", "traceback", EngineUnreachable("refused")).as_instanceof_cause()
    assert unserved(wrapped, False)
    assert not unserved(RayTaskError("lease", "traceback", ValueError("bug")), False)
    assert not unserved(EngineUnavailable("timeout"), False)
    assert not unserved(EngineReplyError(500, "boom", "generation"), False)
    assert not unserved(ValueError("router bug"), False)
