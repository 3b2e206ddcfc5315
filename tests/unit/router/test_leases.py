"""Engine leases (`serve_app.router.leases`): the call on a lease (`LeasedCalls`), the leases a
router keeps (`LeaseKeeper`: what is kept, for how long, and what is given back, also under a
hand-driven clock), how a router takes them (`TierLeases`) and how a replica grants them
(`ReplicaLeases`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from serve_app.engine.client import EngineReply
from serve_app.errors import EngineUnreachable, TierUnavailable
from serve_app.router.leases import (
    SPARE,
    EngineLease,
    Keeping,
    Lease,
    LeasedCalls,
    LeaseKeeper,
    ReplicaLeases,
    TierLeases,
    reusable_after,
)
from serve_app.tier.call import TierCall

from .clock import Clock

ENGINE = EngineLease("http://10.0.0.5:8011", "k")


class Grant:
    """Serve's response generator of `TierDeployment.lease`: the engine, then nothing until
    cancelled, `end` (the replica ending the call) or `ask_back` (its second item, `None`)."""

    def __init__(self, engine: EngineLease = ENGINE) -> None:
        self._engine: EngineLease | None = engine
        self._next: asyncio.Future[bool] | None = None
        self.cancelled = 0

    async def __anext__(self) -> EngineLease | None:
        if self._engine is not None:
            engine, self._engine = self._engine, None
            return engine
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        if await self._next:
            return None
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled += 1
        if self._next is not None and not self._next.done():
            self._next.set_exception(asyncio.CancelledError())

    def end(self) -> None:
        self._answer(False)

    def ask_back(self) -> None:
        self._answer(True)

    def _answer(self, item: bool) -> None:
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        self._next.set_result(item)


class Engine:
    def __init__(self, chunks: list[str], fail: BaseException | None = None) -> None:
        self.chunks = chunks
        self.fail = fail
        self.started: list[EngineLease] = []

    def start(self, lease: EngineLease) -> AsyncIterator[str]:
        self.started.append(lease)

        async def items() -> AsyncIterator[str]:
            for chunk in self.chunks:
                yield chunk
            if self.fail is not None:
                raise self.fail

        return items()


async def drain(calls: LeasedCalls[str]) -> list[str | None]:
    return [item async for item in _iterate(calls)]


async def _iterate(calls: LeasedCalls[str]) -> AsyncIterator[str | None]:
    while True:
        try:
            yield await anext(calls)
        except StopAsyncIteration:
            return


def test_a_stream_run_to_its_end_hands_its_lease_to_the_next_request() -> None:
    async def run() -> None:
        keeper, grant, engine = LeaseKeeper(2.0, 0.05), Grant(), Engine(["a", "b"])
        first = LeasedCalls(engine.start, "sim", call=grant, keeper=keeper)
        assert await drain(first) == [None, "a", "b"]
        first.cancel()
        assert grant.cancelled == 0 and len(keeper) == 1
        kept = keeper.take()
        assert kept is not None and kept.call is grant and len(keeper) == 0
        second = LeasedCalls(engine.start, "sim", kept=kept, keeper=keeper)
        assert await anext(second) is None  # taken at once: no Ray call
        assert await anext(second) == "a"
        second.cancel()  # hung up mid-stream: the lease goes back to the replica
        await asyncio.sleep(0)
        assert grant.cancelled == 1 and len(keeper) == 0
        assert engine.started == [ENGINE, ENGINE]

    asyncio.run(run())


def test_a_lease_its_replica_asks_back_goes_back_after_its_request() -> None:
    """Every slot of the replica is leased: requests may wait in Serve for one, so the lease
    is not kept for this router's next request."""

    async def run() -> None:
        keeper, grant = LeaseKeeper(2.0, 0.05), Grant()
        calls = LeasedCalls(Engine(["a", "b"]).start, "sim", call=grant, keeper=keeper)
        assert await anext(calls) is None
        assert await anext(calls) == "a"
        grant.ask_back()
        await asyncio.sleep(0.01)  # the item reaches the router while its request streams
        assert await anext(calls) == "b"
        with pytest.raises(StopAsyncIteration):
            await anext(calls)
        calls.cancel()
        assert grant.cancelled == 1 and len(keeper) == 0 and keeper.take() is None

    asyncio.run(run())


def test_a_failed_engine_call_gives_its_lease_back() -> None:
    async def run() -> None:
        keeper, grant = LeaseKeeper(2.0, 0.05), Grant()
        calls = LeasedCalls(Engine(["a"], RuntimeError("engine gone")).start, "sim",
                            call=grant, keeper=keeper)  # fmt: skip
        await anext(calls)
        assert await anext(calls) == "a"
        with pytest.raises(RuntimeError, match="engine gone"):
            await anext(calls)
        calls.cancel()
        calls.cancel()
        assert grant.cancelled == 1 and len(keeper) == 0

    asyncio.run(run())


def test_whole_answers_keep_the_lease_unless_the_engine_failed_or_was_full() -> None:
    async def answer(status: int) -> tuple[int, int]:
        keeper, grant = LeaseKeeper(2.0, 0.05), Grant()

        async def start(lease: EngineLease) -> AsyncIterator[EngineReply]:
            yield EngineReply(status, b"{}", {})

        calls = LeasedCalls(start, "sim", call=grant, keeper=keeper, finished=reusable_after)
        await anext(calls)
        reply = await anext(calls)
        assert reply is not None and reply.status == status
        calls.cancel()
        return grant.cancelled, len(keeper)

    for status, kept in [(200, True), (422, True), (429, False), (500, False), (503, False)]:
        cancelled, held = asyncio.run(answer(status))
        assert (held == 1) is kept, status
        assert cancelled == (0 if kept else 1), status


def test_without_a_keeper_every_lease_goes_back() -> None:
    async def run() -> Grant:
        grant = Grant()
        calls = LeasedCalls(Engine(["a"]).start, "sim", call=grant)
        await drain(calls)
        calls.cancel()
        return grant

    assert asyncio.run(run()).cancelled == 1


def test_kept_leases_go_back_after_lease_idle_s() -> None:
    async def run() -> None:
        keeper, grants = LeaseKeeper(2.0, 0.02), [Grant(), Grant()]
        for grant in grants:
            keeper.keep(await granted(grant))
        await asyncio.sleep(0.1)
        assert len(keeper) == 0 and [g.cancelled for g in grants] == [1, 1]
        assert keeper.take() is None

    asyncio.run(run())


def test_a_lease_older_than_lease_reuse_s_is_not_handed_out() -> None:
    async def run() -> None:
        clock = Clock(100.0)
        keeper = LeaseKeeper(2.0, 0.05, clock)
        old, young = Grant(), Grant()
        keeper.keep(await granted(old, clock.now - 1.99))
        keeper.keep(await granted(young, clock.now))
        clock.now += 0.02
        assert (await_take(keeper)).call is young  # newest first
        keeper.keep(await granted(Grant(), clock.now - 2.5))  # too old to keep at all
        assert len(keeper) == 1
        assert keeper.take() is None  # `old` is past 2 s now: given back, not handed out
        assert old.cancelled == 1 and young.cancelled == 0
        keeper.close()

    asyncio.run(run())


def test_a_lease_its_replica_ended_is_not_handed_out() -> None:
    async def run() -> None:
        keeper, ended, alive = LeaseKeeper(2.0, 0.05), Grant(), Grant()
        keeper.keep(await granted(alive))
        keeper.keep(await granted(ended))
        await asyncio.sleep(0)  # the keeper watches the call
        ended.end()  # the replica stopped or died: its Ray call ended
        await asyncio.sleep(0)
        assert await_take(keeper).call is alive
        assert keeper.take() is None
        keeper.close()

    asyncio.run(run())


def test_a_kept_lease_its_replica_asks_back_goes_back_at_once() -> None:
    async def run() -> None:
        keeper, asked, other = LeaseKeeper(2.0, 10.0), Grant(), Grant()
        keeper.keep(await granted(other))
        keeper.keep(await granted(asked))
        await asyncio.sleep(0)  # the keeper watches the calls
        asked.ask_back()  # every slot of its replica is leased: give it back, don't wait 10 s
        await asyncio.sleep(0.01)
        assert asked.cancelled == 1 and other.cancelled == 0 and len(keeper) == 1
        assert await_take(keeper).call is other
        keeper.close()

    asyncio.run(run())


def test_close_gives_every_kept_lease_back() -> None:
    async def run() -> list[Grant]:
        keeper, grants = LeaseKeeper(2.0, 10.0), [Grant(), Grant(), Grant()]
        for grant in grants:
            keeper.keep(await granted(grant))
        keeper.close()
        return grants

    assert [g.cancelled for g in asyncio.run(run())] == [1, 1, 1]


async def granted(grant: Grant, at: float | None = None) -> Lease:
    engine = await anext(grant)
    return Lease(grant, engine, at if at is not None else asyncio.get_running_loop().time())


def await_take(keeper: LeaseKeeper) -> Lease:
    lease = keeper.take()
    assert lease is not None
    return lease


class Granter:
    """The tier's side of a spare lease's renewal: each call grants a fresh lease, fails, or
    (`hang`) never answers: no replica takes it."""

    def __init__(
        self,
        fail: BaseException | None = None,
        hang: bool = False,
        delay: float = 0.0,
        clock: Clock | None = None,
    ) -> None:
        self.grants: list[Grant] = []
        self.fail = fail
        self.hang = hang
        self.delay = delay
        self.clock = clock  # stamps the fresh leases; the loop's time without one
        self.calls = 0

    async def __call__(self) -> Lease:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.hang:
            await asyncio.Event().wait()
        if self.fail is not None:
            raise self.fail
        self.grants.append(Grant())
        return await granted(self.grants[-1], self.clock() if self.clock is not None else None)


def spare_keeper(granter: Granter, spare_s: float = 10.0) -> LeaseKeeper:
    """Leases reused for 0.2 s (a spare is renewed at 0.15 s), idle for 0.02 s."""
    return LeaseKeeper(0.2, 0.02, spare_s=spare_s, grant=granter)


async def with_spare(granter: Granter) -> tuple[LeaseKeeper, Grant]:
    """A keeper whose one lease has gone idle and is its spare now."""
    keeper, grant = spare_keeper(granter), Grant()
    keeper.keep(await granted(grant))
    await asyncio.sleep(0.05)
    assert keeper.spare is not None and keeper.spare.call is grant
    return keeper, grant


def test_the_newest_idle_lease_stays_as_the_spare_and_is_renewed() -> None:
    async def run() -> None:
        granter = Granter()
        keeper = spare_keeper(granter)
        older, newer = Grant(), Grant()
        keeper.keep(await granted(older))
        keeper.keep(await granted(newer))
        await asyncio.sleep(0.06)  # both idle past 0.02 s: the newer stays as the spare
        assert (older.cancelled, newer.cancelled, len(keeper)) == (1, 0, 1)
        assert keeper.spare is not None and keeper.spare.call is newer
        await asyncio.sleep(0.15)  # renewed once it was 0.15 s old: fresh lease first, then back
        assert newer.cancelled == 1 and len(granter.grants) == 1
        spare = await_take(keeper)  # a request after the pause skips the Ray call
        assert spare.call is granter.grants[0] and len(keeper) == 0
        keeper.close()
        assert granter.grants[0].cancelled == 0  # in use by the request, not the keeper's

    asyncio.run(run())


def test_a_lease_a_long_answer_made_too_old_seeds_the_spare_renewed_at_once() -> None:
    """The answer outlived `lease_reuse_s`: its lease is not handed out again, but it stays
    until a fresh one has replaced it, so a request after a pause still skips the Ray call."""

    async def run() -> None:
        granter = Granter()
        keeper, old = spare_keeper(granter), Grant()
        keeper.keep(await granted(old, asyncio.get_running_loop().time() - 0.5))
        await asyncio.sleep(0.02)
        assert old.cancelled == 1 and len(granter.grants) == 1
        assert await_take(keeper).call is granter.grants[0]
        keeper.close()

    asyncio.run(run())


def test_the_spare_goes_back_lease_spare_s_after_the_last_request() -> None:
    async def run() -> None:
        granter = Granter()
        keeper = spare_keeper(granter, spare_s=0.25)
        first = Grant()
        keeper.keep(await granted(first))
        await asyncio.sleep(0.6)  # renewed at 0.15 s, then the renewal at 0.3 s finds it idle
        assert len(keeper) == 0 and keeper.take() is None
        assert first.cancelled == 1 and len(granter.grants) == 1
        assert granter.grants[0].cancelled == 1

    asyncio.run(run())


def test_a_spare_its_replica_asks_back_goes_back_and_is_not_renewed() -> None:
    async def run() -> None:
        granter = Granter()
        keeper, grant = await with_spare(granter)
        grant.ask_back()  # every slot of its replica is leased
        await asyncio.sleep(0.3)
        assert grant.cancelled == 1 and len(keeper) == 0 and granter.grants == []

    asyncio.run(run())


def test_a_spare_asked_back_while_it_is_renewed_is_not_replaced() -> None:
    async def run() -> None:
        granter = Granter(delay=0.2)
        keeper, grant = LeaseKeeper(1.0, 0.02, spare_s=10, grant=granter), Grant()
        keeper.keep(await granted(grant))
        await asyncio.sleep(0.85)  # the renewal started at 0.75 s; its lease comes at 0.95 s
        assert keeper.spare is not None and granter.calls == 1 and not granter.grants
        grant.ask_back()  # every slot of its replica is leased meanwhile
        await asyncio.sleep(0.3)
        assert grant.cancelled == 1 and len(keeper) == 0
        assert [g.cancelled for g in granter.grants] == [1]  # the fresh lease went back too

    asyncio.run(run())


def test_a_spare_that_cannot_be_renewed_goes_back() -> None:
    async def run() -> None:
        keeper, grant = spare_keeper(Granter(RuntimeError("no replica"))), Grant()
        keeper.keep(await granted(grant))
        await asyncio.sleep(0.3)
        assert grant.cancelled == 1 and len(keeper) == 0 and keeper.take() is None

    asyncio.run(run())


def test_close_gives_the_spare_back_and_renews_nothing() -> None:
    async def run() -> None:
        granter = Granter()
        keeper, grant = await with_spare(granter)
        keeper.close()
        await asyncio.sleep(0.3)
        assert grant.cancelled == 1 and granter.grants == []
        keeper.keep(await granted(late := Grant()))  # a request that ends after the close
        assert late.cancelled == 1 and len(keeper) == 0

    asyncio.run(run())


def test_a_spare_that_went_idle_during_a_renewal_is_still_renewed_and_given_back() -> None:
    """The spare is taken by a request while its renewal waits for a replica; a second request
    takes a fresh lease, and when both end the fresher lease becomes the spare. Its renewal
    comes due while the first is still waiting: once that one gives up, the new spare is
    renewed in turn (here: no replica answers), not held until its replica ends it."""

    async def run() -> None:
        granter = Granter(hang=True)
        keeper = LeaseKeeper(0.6, 0.06, spare_s=10, grant=granter)
        first = Grant()
        keeper.keep(await granted(first))
        await asyncio.sleep(0.5)  # the spare since 0.06 s; its renewal waits since 0.45 s
        assert granter.calls == 1
        taken = await_take(keeper)
        assert taken.call is first
        keeper.keep(taken)
        keeper.keep(await granted(second := Grant()))  # renewal due at 0.95 s
        await asyncio.sleep(0.15)  # both idle: `second`, the younger, is the spare
        assert keeper.spare is not None and keeper.spare.call is second
        await asyncio.sleep(1.5)  # the first renewal gives up at 1.05 s, the second at 1.65 s
        assert (first.cancelled, second.cancelled, len(keeper)) == (1, 1, 0)
        assert granter.calls == 2

    asyncio.run(run())


OTHER = EngineLease("http://10.0.0.6:8011", "k2")


def test_an_engine_that_refuses_a_connection_takes_every_lease_on_it_back() -> None:
    """Its engine exited (its replica is going): the router's other leases on that engine,
    kept or spare, go back at once instead of failing the next requests one by one."""

    async def run() -> None:
        # The spare (a lease too old to hand out) waits for a renewal no replica answers.
        keeper = LeaseKeeper(2.0, 10.0, spare_s=10, grant=Granter(hang=True))
        same, other, spare = Grant(), Grant(OTHER), Grant()
        keeper.keep(await granted(spare, asyncio.get_running_loop().time() - 5))
        keeper.keep(await granted(other))
        keeper.keep(await granted(same))
        assert keeper.spare is not None and keeper.spare.call is spare and len(keeper) == 3
        failing = Grant()
        calls = LeasedCalls(Engine([], EngineUnreachable("refused")).start, "sim",
                            call=failing, keeper=keeper)  # fmt: skip
        assert await anext(calls) is None
        with pytest.raises(EngineUnreachable):
            await anext(calls)
        calls.cancel()
        assert (failing.cancelled, same.cancelled, spare.cancelled) == (1, 1, 1)
        assert other.cancelled == 0 and len(keeper) == 1
        assert await_take(keeper).call is other
        keeper.close()

    asyncio.run(run())


# -- the call on a lease ---------------------------------------------------------------------

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


class ClosingEngine:
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
    async def run() -> tuple[list[str | None], FakeLease, ClosingEngine]:
        lease, engine = FakeLease(LEASE), ClosingEngine(["a", "b"])
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
    async def run() -> tuple[FakeLease, ClosingEngine]:
        lease, engine = FakeLease(LEASE), ClosingEngine(["a", "b", "c"])
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
    async def run() -> tuple[FakeLease, ClosingEngine]:
        lease, engine = FakeLease(LEASE), ClosingEngine(["a"])
        LeasedCalls(engine.start, "small", call=lease).cancel()
        await asyncio.sleep(0)
        return lease, engine

    lease, engine = asyncio.run(run())
    assert lease.cancelled == 1 and engine.leases == []


def test_a_lease_that_ends_empty_is_a_tier_unavailable() -> None:
    async def run() -> None:
        await anext(LeasedCalls(ClosingEngine([]).start, "small", call=FakeLease()))

    with pytest.raises(TierUnavailable, match="tier 'small' gave no engine"):
        asyncio.run(run())


def test_the_lease_never_shows_its_key() -> None:
    assert "k'" not in repr(LEASE) and "api_key" not in repr(LEASE)


# -- the keeper under a hand-driven clock ----------------------------------------------------


@dataclass
class Timer:
    when: float
    callback: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualTimers:
    """The keeper's `Timers` on a test's `Clock`: a timer fires while `advance` moves the clock
    past it, in the order they come due (those set meanwhile too)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._timers: list[Timer] = []

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(self.clock.now + delay, callback)
        self._timers.append(timer)
        return timer

    def advance(self, seconds: float) -> None:
        end = self.clock.now + seconds
        while due := [t for t in self._timers if not t.cancelled and t.when <= end]:
            timer = min(due, key=lambda t: t.when)
            self._timers.remove(timer)
            self.clock.now = max(self.clock.now, timer.when)
            timer.callback()
        self.clock.now = end


async def settle() -> None:
    """Let the event loop run what the keeper started (watches, renewals): no time passes."""
    for _ in range(5):
        await asyncio.sleep(0)


def manual(
    reuse_s: float = 2.0, idle_s: float = 0.5, granter: Granter | None = None
) -> tuple[Clock, ManualTimers, LeaseKeeper]:
    """A keeper on a hand-driven clock; with `granter`, one that keeps a spare (`spare_s` 10)."""
    clock = Clock(100.0)
    timers = ManualTimers(clock)
    if granter is None:
        return clock, timers, LeaseKeeper(reuse_s, idle_s, clock, timers=timers)
    granter.clock = clock
    keeper = LeaseKeeper(reuse_s, idle_s, clock, spare_s=10.0, grant=granter, timers=timers)
    return clock, timers, keeper


def test_each_kept_lease_goes_back_once_idle_s_has_passed_since_its_request() -> None:
    async def run() -> None:
        clock, timers, keeper = manual(idle_s=0.5)
        first, second = Grant(), Grant()
        keeper.keep(await granted(first, clock.now))
        timers.advance(0.2)
        keeper.keep(await granted(second, clock.now))
        timers.advance(0.3)  # `first` idle for exactly 0.5 s: still kept
        assert (first.cancelled, second.cancelled, len(keeper)) == (0, 0, 2)
        timers.advance(0.01)
        assert (first.cancelled, second.cancelled, len(keeper)) == (1, 0, 1)
        timers.advance(0.2)
        assert (first.cancelled, second.cancelled, len(keeper)) == (1, 1, 0)
        assert keeper.take() is None

    asyncio.run(run())


def test_the_spare_is_renewed_at_renew_at_of_reuse_s() -> None:
    async def run() -> None:
        granter = Granter()
        clock, timers, keeper = manual(reuse_s=2.0, idle_s=0.1, granter=granter)
        grant = Grant()
        keeper.keep(await granted(grant, clock.now))
        timers.advance(0.11)  # idle: the newest lease stays as the spare
        assert keeper.spare is not None and keeper.spare.call is grant
        timers.advance(1.5 - 0.11 - 0.001)  # renewal is due at 0.75 * 2 s
        await settle()
        assert granter.calls == 0 and grant.cancelled == 0
        timers.advance(0.002)
        await settle()  # a fresh lease first, then the old one back
        assert granter.calls == 1 and grant.cancelled == 1
        assert keeper.spare is not None and keeper.spare.call is granter.grants[0]
        timers.advance(1.5)  # the fresh spare in turn, 1.5 s after it was granted
        await settle()
        assert granter.calls == 2 and granter.grants[0].cancelled == 1
        keeper.close()

    asyncio.run(run())


def test_a_renewal_no_replica_answers_gives_the_spare_back_after_reuse_s() -> None:
    async def run() -> None:
        granter = Granter(hang=True)
        clock, timers, keeper = manual(reuse_s=2.0, idle_s=0.1, granter=granter)
        grant = Grant()
        keeper.keep(await granted(grant, clock.now))
        timers.advance(1.5)  # the spare since 0.1 s, its renewal asked for at 1.5 s
        await settle()
        assert granter.calls == 1 and keeper.spare is not None
        timers.advance(1.99)
        await settle()
        assert grant.cancelled == 0 and keeper.spare is not None
        timers.advance(0.02)  # `reuse_s` after the renewal began: it is given up
        await settle()
        assert grant.cancelled == 1 and len(keeper) == 0 and keeper.take() is None

    asyncio.run(run())


def test_a_kept_lease_its_replica_ends_goes_back_at_once() -> None:
    async def run() -> None:
        clock, _, keeper = manual(idle_s=10.0)
        lost, alive = Grant(), Grant()
        keeper.keep(await granted(alive, clock.now))
        keeper.keep(await granted(lost, clock.now))
        await settle()
        lost.end()  # its replica stopped or died: the Ray call ended
        await settle()  # no time passed: no timer decided this
        assert (lost.cancelled, alive.cancelled, len(keeper)) == (1, 0, 1)
        assert await_take(keeper).call is alive and keeper.take() is None

    asyncio.run(run())


def test_a_kept_lease_whose_engine_refuses_takes_every_lease_on_that_engine_back() -> None:
    async def run() -> None:
        granter = Granter(hang=True)
        clock, timers, keeper = manual(idle_s=0.1, granter=granter)
        spare, other, used = Grant(), Grant(OTHER), Grant()
        keeper.keep(await granted(spare, clock.now))
        timers.advance(0.2)  # idle: `spare` is the spare now
        keeper.keep(await granted(other, clock.now))
        keeper.keep(await granted(used, clock.now))
        kept = await_take(keeper)
        assert kept.call is used
        failing = Engine([], EngineUnreachable("the engine refused the connection"))
        calls = LeasedCalls(failing.start, "sim", kept=kept, keeper=keeper, clock=clock)
        assert await anext(calls) is None  # a kept lease: taken at once
        with pytest.raises(EngineUnreachable):
            await anext(calls)
        calls.cancel()
        assert (used.cancelled, spare.cancelled, other.cancelled) == (1, 1, 0)
        assert len(keeper) == 1 and await_take(keeper).call is other

    asyncio.run(run())


# -- how a router takes a tier's leases ------------------------------------------------------

CALL = TierCall("/generate", {"inputs": "hi"}, stream=False, max_tokens=8, prompt_chars=2)


def test_a_tier_keeping_leases_asks_once_for_two_requests_in_turn() -> None:
    async def run() -> tuple[list[TierCall], list[Grant]]:
        asked: list[TierCall] = []
        grants: list[Grant] = []

        def ask(call: TierCall) -> Grant:
            asked.append(call)
            grants.append(Grant())
            return grants[-1]

        clock = Clock(100.0)
        leases = TierLeases("sim", ask, Keeping(2.0, 10.0), clock, ManualTimers(clock))
        for _ in range(2):
            calls = leases.calls(CALL, Engine(["a"]).start)
            assert await drain(calls) == [None, "a"]
            calls.cancel()
        leases.close()
        return asked, grants

    asked, grants = asyncio.run(run())
    assert asked == [CALL] and [g.cancelled for g in grants] == [1]


def test_a_tier_without_keeping_asks_for_every_request_and_gives_each_back() -> None:
    async def run() -> list[Grant]:
        grants: list[Grant] = []

        def ask(call: TierCall) -> Grant:
            grants.append(Grant())
            return grants[-1]

        leases = TierLeases("sim", ask)
        assert leases.keeper is None
        for _ in range(2):
            calls = leases.calls(CALL, Engine(["a"]).start)
            await drain(calls)
            calls.cancel()
        return grants

    assert [g.cancelled for g in asyncio.run(run())] == [1, 1]


def test_a_spare_is_asked_for_no_request() -> None:
    async def run() -> list[TierCall]:
        asked: list[TierCall] = []

        def ask(call: TierCall) -> Grant:
            asked.append(call)
            return Grant()

        clock = Clock(100.0)
        timers = ManualTimers(clock)
        leases = TierLeases("sim", ask, Keeping(2.0, 0.1, spare_s=10.0), clock, timers)
        calls = leases.calls(CALL, Engine(["a"]).start)
        await drain(calls)
        calls.cancel()  # kept, then the spare once idle
        timers.advance(1.5)
        await settle()
        leases.close()
        return asked

    assert asyncio.run(run()) == [CALL, SPARE]


# -- how a replica grants them ---------------------------------------------------------------


async def first(grant: AsyncIterator[EngineLease | None]) -> EngineLease | None:
    return await anext(grant)


def test_a_replica_counts_its_leases_until_each_is_given_back() -> None:
    async def run() -> list[int]:
        counts: list[int] = []
        replica = ReplicaLeases(slots=4, hold_s=3600, kept=False, on_count=counts.append)
        a, b = replica.grant(LEASE), replica.grant(LEASE)
        assert await first(a) == LEASE and await first(b) == LEASE
        assert replica.held == 2
        await a.aclose()  # type: ignore[attr-defined]
        await b.aclose()  # type: ignore[attr-defined]
        return counts

    assert asyncio.run(run()) == [1, 2, 1, 0]


def test_a_lease_is_held_hold_s_at_most() -> None:
    async def run() -> int:
        replica = ReplicaLeases(slots=1, hold_s=0.0, kept=False)
        grant = replica.grant(LEASE)
        assert await first(grant) == LEASE
        with pytest.raises(StopAsyncIteration):  # not kept: no `None`, even with every slot
            await anext(grant)
        return replica.held

    assert asyncio.run(run()) == 0


def test_taking_the_last_slot_asks_every_kept_lease_back() -> None:
    async def run() -> tuple[EngineLease | None, bool]:
        replica = ReplicaLeases(slots=2, hold_s=3600, kept=True)
        a, b = replica.grant(LEASE), replica.grant(LEASE)
        await first(a)
        asked_back = asyncio.ensure_future(anext(a))
        await settle()
        assert not asked_back.done()  # one slot of two leased
        await first(b)  # the last slot
        answer = await asyncio.wait_for(asked_back, 5)
        later = asyncio.ensure_future(anext(b))  # waits for the next time every slot is leased
        await settle()
        waiting = not later.done()
        later.cancel()
        await a.aclose()  # type: ignore[attr-defined]
        await asyncio.gather(later, return_exceptions=True)
        return answer, waiting

    assert asyncio.run(run()) == (None, True)
