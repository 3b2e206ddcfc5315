"""The direct data path's call (`LeasedCalls`): a lease first, then the engine call started on
it; cancelling ends both, whatever point the call had reached."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from serve_app.errors import TierUnavailable
from serve_app.router.direct import LeasedCalls
from serve_app.tier.call import EngineLease

LEASE = EngineLease("http://10.0.0.5:8011", "k", {"traceparent": "00-ab-cd-01"})


class FakeLease:
    """Serve's response generator of `TierDeployment.lease`: its items, and `cancel`."""

    def __init__(self, *items: EngineLease) -> None:
        self._items = list(items)
        self.cancelled = 0

    def __anext__(self) -> asyncio.Future[EngineLease]:
        future: asyncio.Future[EngineLease] = asyncio.get_running_loop().create_future()
        if self._items:
            future.set_result(self._items.pop(0))
        else:
            future.set_exception(StopAsyncIteration())
        return future

    def cancel(self) -> None:
        self.cancelled += 1


class Engine:
    def __init__(self, chunks: list[str]) -> None:
        self.chunks = chunks
        self.leases: list[EngineLease] = []
        self.closed = False

    def start(self, lease: EngineLease) -> AsyncIterator[str]:
        self.leases.append(lease)

        async def items() -> AsyncIterator[str]:
            try:
                for chunk in self.chunks:
                    yield chunk
            finally:
                self.closed = True

        return items()


def test_the_first_item_says_taken_then_the_engines_chunks_follow() -> None:
    async def run() -> tuple[list[str | None], FakeLease, Engine]:
        lease, engine = FakeLease(LEASE), Engine(["a", "b"])
        calls = LeasedCalls(engine.start, "small", call=lease)
        items = [await anext(calls), await anext(calls), await anext(calls)]
        items.append(await anext(calls, None))
        calls.cancel()
        await asyncio.sleep(0)
        return items, lease, engine

    items, lease, engine = asyncio.run(run())
    assert items == [None, "a", "b", None]
    assert engine.leases == [LEASE] and lease.cancelled == 1


def test_cancel_mid_stream_closes_the_engine_call_and_gives_the_lease_back() -> None:
    async def run() -> tuple[FakeLease, Engine]:
        lease, engine = FakeLease(LEASE), Engine(["a", "b", "c"])
        calls = LeasedCalls(engine.start, "small", call=lease)
        await anext(calls)
        assert await anext(calls) == "a"
        calls.cancel()
        calls.cancel()  # twice: the second does nothing more
        await asyncio.sleep(0.01)
        return lease, engine

    lease, engine = asyncio.run(run())
    assert engine.closed and lease.cancelled == 1


def test_cancel_before_a_replica_took_it_starts_no_engine_call() -> None:
    async def run() -> tuple[FakeLease, Engine]:
        lease, engine = FakeLease(LEASE), Engine(["a"])
        LeasedCalls(engine.start, "small", call=lease).cancel()
        await asyncio.sleep(0)
        return lease, engine

    lease, engine = asyncio.run(run())
    assert lease.cancelled == 1 and engine.leases == []


def test_a_lease_that_ends_empty_is_a_tier_unavailable() -> None:
    async def run() -> None:
        await anext(LeasedCalls(Engine([]).start, "small", call=FakeLease()))

    with pytest.raises(TierUnavailable, match="tier 'small' gave no engine"):
        asyncio.run(run())


def test_the_lease_never_shows_its_key() -> None:
    assert "k'" not in repr(LEASE) and "api_key" not in repr(LEASE)
