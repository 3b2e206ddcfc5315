"""Sending a call to a tier (`serve_app.router.dispatch.Dispatcher`): which failures are tried
once more, and that every attempt's call is cancelled; Ray's exceptions as the project's."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiohttp import web
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from serve_app.config import AppConfig
from serve_app.engine.client import EngineReply
from serve_app.errors import (
    EngineReplyError,
    EngineUnavailable,
    EngineUnreachable,
    ReplicaUnavailable,
    ServeAppError,
    TierOverloaded,
    TierUnavailable,
)
from serve_app.router.dispatch import Dispatcher, RayCalls, ServeTransport, ray_errors, unserved
from serve_app.router.errors import api_error
from serve_app.router.leases import EngineLease
from serve_app.tier.call import TierCall
from serve_app.tracing import OFF

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
    return asyncio.run(Dispatcher(transport, {"small": 1.0}).stream("small", CALL, OFF))[0]


def request(transport: Transport) -> EngineReply:
    return asyncio.run(Dispatcher(transport, {"small": 1.0}).request("small", CALL, OFF))


DIED = ReplicaUnavailable("the replica of tier 'small' serving this request died; retry")
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
        with pytest.raises(ReplicaUnavailable):
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


@pytest.mark.parametrize(
    ("ray_error", "error", "status", "code"),
    [
        (ActorDiedError(), ReplicaUnavailable, 503, "replica_unavailable"),
        (ActorUnavailableError("gone", None), ReplicaUnavailable, 503, "replica_unavailable"),
        (BackPressureError(num_queued_requests=9, max_queued_requests=8), TierOverloaded, 429,
         "tier_overloaded"),
        (DeploymentUnavailableError("tier-small"), TierUnavailable, 503, "tier_unavailable"),
    ],
)  # fmt: skip
def test_rays_errors_become_the_projects_at_the_transport(
    ray_error: Exception, error: type[ServeAppError], status: int, code: str
) -> None:
    with pytest.raises(error) as caught, ray_errors("small"):
        raise ray_error
    assert caught.value.__cause__ is ray_error
    shown = api_error(caught.value)
    assert (shown.status, shown.code) == (status, code) and "'small'" in shown.message


def test_an_error_a_replica_raised_passes_as_it_is() -> None:
    """Ray's wrapper subclasses the project's error: the error table reads it as it is."""
    wrapped = RayTaskError("lease", "tb", EngineReplyError(429, "busy", "overloaded"))
    raised = wrapped.as_instanceof_cause()
    with pytest.raises(EngineReplyError) as caught, ray_errors("small"):
        raise raised
    assert caught.value is raised


def test_a_serve_call_raises_the_projects_errors_and_cancels_through() -> None:
    class Died:
        cancelled = False

        async def __anext__(self) -> Any:
            raise ActorDiedError()

        def cancel(self) -> None:
            self.cancelled = True

    died = Died()
    calls: RayCalls[Any] = RayCalls("small", died)
    with pytest.raises(ReplicaUnavailable):
        asyncio.run(calls.__anext__())
    calls.cancel()
    assert died.cancelled


# -- the direct data path through `ServeTransport`, against a real engine server -------------


class LeaseCall:
    """Serve's call to `TierDeployment.lease`: the engine, then nothing until cancelled."""

    def __init__(self, engine: EngineLease) -> None:
        self._engine: EngineLease | None = engine
        self.cancelled = False

    async def __anext__(self) -> EngineLease | None:
        if self._engine is not None:
            engine, self._engine = self._engine, None
            return engine
        await asyncio.Event().wait()  # until cancelled
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


class DirectTier:
    """A direct tier's Serve handle: `lease.remote` grants the engine at `url`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.asked: list[TierCall] = []
        self.lease = self

    def options(self, **options: Any) -> DirectTier:
        return self

    def remote(self, call: TierCall) -> LeaseCall:
        self.asked.append(call)
        return LeaseCall(EngineLease(self.url, "engine-key", {"traceparent": "00-ab-cd-01"}))


def test_the_direct_path_streams_from_the_leased_engine_and_keeps_the_lease() -> None:
    seen: list[tuple[str, str | None, str | None, Any]] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        auth, trace = request.headers.get("authorization"), request.headers.get("traceparent")
        seen.append((request.path, auth, trace, await request.json()))
        if request.path == "/generate":
            return web.json_response({"generated_text": "Paris"})
        reply = web.StreamResponse()
        await reply.prepare(request)
        await reply.write(b"data: a\n\ndata: b\n\n")
        await reply.write_eof()
        return reply

    async def run() -> tuple[list[Any], DirectTier]:
        app = web.Application()
        app.router.add_post("/{route:.*}", answer)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        tier = DirectTier(f"http://127.0.0.1:{runner.addresses[0][1]}")
        config = AppConfig.model_validate({"tiers": [{"name": "small"}]}).tiers[0]
        transport = ServeTransport({"small": tier}, {"small": config})  # type: ignore[dict-item]
        try:
            chunks = transport.stream("small", CALL)
            items = [await anext(chunks), await anext(chunks)]
            with pytest.raises(StopAsyncIteration):
                await anext(chunks)
            chunks.cancel()  # ran to its end: the lease is kept
            generate = TierCall("/generate", {"inputs": "hi"}, False, 8, 2)
            replies = transport.request("small", generate)
            items += [await anext(replies), (await anext(replies)).status]
            replies.cancel()
        finally:
            await runner.cleanup()
        return items, tier

    items, tier = asyncio.run(run())
    assert items == [None, ["a", "b"], None, 200]
    assert [call.payload for call in tier.asked] == [{}]  # one lease; the prompt stayed here
    auth, trace = "Bearer engine-key", "00-ab-cd-01"
    assert seen == [
        ("/v1/chat/completions", auth, trace, {"messages": []}),
        ("/generate", auth, trace, {"inputs": "hi"}),
    ]


def test_an_update_gives_back_the_kept_leases_of_a_tier_whose_keeping_changed() -> None:
    """A router's live reconfiguration: tiers whose lease keeping is as it was keep their kept
    leases; a tier that keeps differently now, or is gone, has its own given back."""
    tiers = AppConfig.model_validate({"tiers": [{"name": "small"}, {"name": "large"}]}).tiers
    small, large = tiers
    handles = {"small": DirectTier("http://small"), "large": DirectTier("http://large")}

    async def run() -> None:
        transport = ServeTransport(handles, {"small": small, "large": large})  # type: ignore[arg-type]
        kept = dict(transport._leases)
        quicker = large.model_copy(
            update={"tuning": large.tuning.model_copy(update={"lease_idle_s": 0.5})}
        )
        closed: list[str] = []
        for name, leases in kept.items():
            leases.close = lambda name=name: closed.append(name)  # type: ignore[method-assign]
        transport.update(handles, {"small": small, "large": quicker})  # type: ignore[arg-type]
        assert transport._leases["small"] is kept["small"]
        assert transport._leases["large"] is not kept["large"] and closed == ["large"]
        transport.update({"large": handles["large"]}, {"large": quicker})  # type: ignore[dict-item]
        assert closed == ["large", "small"] and set(transport._leases) == {"large"}

    asyncio.run(run())


# -- a tier's state (`serve_app.router.tier_states`) ------------------------------------------


class Waiting(Attempt):
    """A call no replica takes."""

    async def __anext__(self) -> Any:
        await asyncio.sleep(3600)


def test_a_failed_tier_is_refused_at_once_with_serves_reason() -> None:
    from serve_app.router.tier_states import TierBoard, TierState, TierStatus

    board = TierBoard()
    board.put(TierStatus("small", TierState.FAILED, 0.0, "exited with code 1 during start-up"))
    transport = Transport(Waiting())
    dispatcher = Dispatcher(transport, {"small": 600.0}, board, clock=lambda: 10.0)
    with pytest.raises(TierUnavailable) as refused:
        asyncio.run(dispatcher.request("small", CALL, OFF))
    assert refused.value.message == (
        "tier 'small' failed to start: exited with code 1 during start-up; retry later"
    )
    assert refused.value.retry_after_s == 60
    assert transport.made[0].cancelled


def test_a_wait_ends_when_the_tier_fails_meanwhile() -> None:
    from serve_app.router.tier_states import TierBoard, TierState, TierStatus

    async def scenario() -> TierUnavailable:
        board = TierBoard()
        board.put(TierStatus("small", TierState.LOADING, 0.0))
        dispatcher = Dispatcher(Transport(Waiting()), {"small": 600.0}, board)
        waiting = asyncio.ensure_future(dispatcher.request("small", CALL, OFF))
        await asyncio.sleep(0.05)
        board.put(TierStatus("small", TierState.FAILED, 0.0, "not ready within 900s"))
        try:
            await asyncio.wait_for(waiting, 2)
        except TierUnavailable as exc:
            return exc
        raise AssertionError("the wait went on")

    assert "tier 'small' failed to start: not ready within 900s" in asyncio.run(scenario()).message


def test_a_wait_that_runs_out_names_the_tiers_state() -> None:
    from serve_app.router.tier_states import TierBoard, TierState, TierStatus

    board = TierBoard()
    board.put(TierStatus("small", TierState.LOADING, 5.0))
    dispatcher = Dispatcher(Transport(Waiting()), {"small": 0.05}, board, clock=lambda: 100.0)
    with pytest.raises(TierUnavailable) as refused:
        asyncio.run(dispatcher.stream("small", CALL, OFF))
    assert refused.value.message == (
        "tier 'small' is loading its model (started 95 s ago); no replica of tier 'small' took "
        "the request within 0s (replica_wait_timeout_s); retry later"
    )
    assert refused.value.retry_after_s == 15
    # a ready tier (or one whose state is unknown) that runs out is saturated, as before
    board.put(TierStatus("small", TierState.READY, 5.0))
    dispatcher = Dispatcher(Transport(Waiting()), {"small": 0.05}, board)
    with pytest.raises(TierUnavailable, match="the tier is starting or saturated"):
        asyncio.run(dispatcher.stream("small", CALL, OFF))
