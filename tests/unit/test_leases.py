"""Kept engine leases (`serve_app.router.leases`) and the calls that keep them
(`serve_app.router.direct.LeasedCalls`): what is kept, for how long, and what is given back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from serve_app.engine.client import EngineReply
from serve_app.errors import EngineUnreachable
from serve_app.router.direct import EngineCalls, LeasedCalls
from serve_app.router.leases import Lease, LeaseKeeper
from serve_app.tier.call import EngineLease

ENGINE = EngineLease("http://10.0.0.5:8011", "k")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


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

        calls = LeasedCalls(start, "sim", call=grant, keeper=keeper, finished=EngineCalls.finished)
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
        clock = Clock()
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
        self, fail: BaseException | None = None, hang: bool = False, delay: float = 0.0
    ) -> None:
        self.grants: list[Grant] = []
        self.fail = fail
        self.hang = hang
        self.delay = delay
        self.calls = 0

    async def __call__(self) -> Lease:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.hang:
            await asyncio.Event().wait()
        if self.fail is not None:
            raise self.fail
        self.grants.append(Grant())
        return await granted(self.grants[-1])


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
