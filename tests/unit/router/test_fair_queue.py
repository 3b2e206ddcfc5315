"""Admission: priority classes, virtual token counting across tenants, bounds, every exit."""

from __future__ import annotations

import asyncio
import functools
import random
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from serve_app.errors import AdmissionRefused
from serve_app.router.fair_queue import (
    PRIORITIES,
    Admission,
    Entry,
    FairScheduler,
    Priority,
    Ticket,
    Turns,
)


def entry(tenant: str, priority: Priority = "interactive", cost: float = 100) -> Entry:
    return Entry(tenant, priority, cost, 0.0)


def ordering(**kw: dict[str, float]) -> FairScheduler:
    """A scheduler with turns to spare: only its order matters."""
    return FairScheduler(Turns(max_in_flight=1000), **kw)  # type: ignore[arg-type]


def drain(s: FairScheduler) -> list[str]:
    order = []
    while (e := s.pop(0.0)) is not None:
        order.append(e.tenant)
    return order


def test_interactive_runs_before_batch_whatever_the_counters() -> None:
    s = ordering()
    s.charge("i", 10_000)
    s.push(entry("b", "batch"))
    s.push(entry("i", "interactive"))
    assert drain(s) == ["i", "b"]


def test_a_light_tenant_does_not_wait_behind_a_heavy_tenants_backlog() -> None:
    s = ordering()
    for _ in range(20):
        s.push(entry("heavy"))
    assert [s.pop(0.0).tenant for _ in range(3)] == ["heavy"] * 3  # type: ignore[union-attr]
    s.push(entry("light"))
    # lifted to the heavy tenant's counter, the light tenant is next or next but one
    assert "light" in [s.pop(0.0).tenant for _ in range(2)]  # type: ignore[union-attr]


def test_backlogged_tenants_share_tokens_equally_and_by_weight() -> None:
    s = ordering(weights={"gold": 2.0})
    for _ in range(30):
        s.push(entry("a", cost=10))
        s.push(entry("b", cost=30))
        s.push(entry("gold", cost=10))
    served: Counter[str] = Counter()
    for _ in range(40):
        e = s.pop(0.0)
        assert e is not None
        served[e.tenant] += int(e.cost)
    # tokens: a and b about equal; gold about twice either
    assert abs(served["a"] - served["b"]) <= 30
    assert 1.6 <= served["gold"] / served["a"] <= 2.4


def test_idle_time_is_not_saved_up_as_credit() -> None:
    s = ordering()
    for _ in range(10):
        s.push(entry("busy"))
        s.pop(0.0)
    s.push(entry("busy"))  # busy keeps going
    for _ in range(5):
        s.push(entry("returning"))  # was idle all along: counter 0 ...
    for _ in range(5):
        s.push(entry("busy"))
    # ... but starts at busy's counter, so the two alternate instead of `returning` x5
    assert drain(s)[:6].count("busy") >= 2


def test_removed_entries_never_run_and_lengths_are_per_class() -> None:
    s = ordering()
    gone, kept = entry("a", "batch"), entry("b", "batch")
    s.push(gone)
    s.push(kept)
    s.push(entry("c"))
    assert (s.length("interactive"), s.length("batch"), len(s)) == (1, 2, 3)
    assert s.remove(gone) and not s.remove(gone)
    assert drain(s) == ["c", "b"]


def in_loop(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run an async test in a fresh event loop (the suite has no async plugin)."""

    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())

    return run


def admission(**kw: float) -> tuple[Admission, list[tuple[str, int]]]:
    seen: list[tuple[str, int]] = []
    a = Admission(
        "small",
        max_in_flight=int(kw.get("max_in_flight", 1)),
        max_queued=int(kw.get("max_queued", 4)),
        max_wait_s=kw.get("max_wait_s", 5.0),
        on_change=lambda tier, priority, n: seen.append((priority, n)),
    )
    return a, seen


@in_loop
async def test_a_waiting_request_runs_when_one_leaves_highest_class_first() -> None:
    a, seen = admission(max_in_flight=1)
    first = await a.enter("t1", "interactive", 10)
    batch = asyncio.create_task(a.enter("t2", "batch", 10))
    inter = asyncio.create_task(a.enter("t3", "interactive", 10))
    await asyncio.sleep(0)
    assert not batch.done() and not inter.done() and a.in_flight == 1
    a.leave(first, tokens=12)
    second = await inter
    assert not batch.done()
    a.leave(second)
    third = await batch
    assert third.priority == "batch" and third.waited_s >= 0
    a.leave(third)
    a.leave(third)  # twice is once
    assert a.in_flight == 0
    assert ("batch", 1) in seen and ("interactive", 0) in seen


@in_loop
async def test_a_full_queue_refuses_at_once_with_retry_after() -> None:
    a, _ = admission(max_in_flight=1, max_queued=1, max_wait_s=2.5)
    await a.enter("t", "interactive", 1)
    waiting = asyncio.create_task(a.enter("t", "interactive", 1))
    await asyncio.sleep(0)
    with pytest.raises(AdmissionRefused) as refused:
        await a.enter("t", "interactive", 1)
    assert refused.value.retry_after_s == 3
    assert "1 requests are already waiting" in refused.value.message
    waiting.cancel()


@in_loop
async def test_a_wait_past_its_bound_is_refused_and_leaves_the_queue() -> None:
    a, seen = admission(max_in_flight=1, max_wait_s=0.05)
    held = await a.enter("t", "interactive", 1)
    with pytest.raises(AdmissionRefused, match=r"no turn within 0\.05s"):
        await a.enter("u", "batch", 1)
    assert len(a.scheduler) == 0 and seen[-1] == ("batch", 0)
    a.leave(held)
    assert a.in_flight == 0


@in_loop
async def test_a_client_that_leaves_while_waiting_frees_its_place() -> None:
    a, _ = admission(max_in_flight=1)
    held = await a.enter("t", "interactive", 1)
    gone = asyncio.create_task(a.enter("u", "interactive", 1))
    after = asyncio.create_task(a.enter("v", "interactive", 1))
    await asyncio.sleep(0)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    a.leave(held)
    ticket = await after
    assert ticket.tenant == "v" and a.in_flight == 1 and len(a.scheduler) == 0


@in_loop
async def test_a_turn_granted_as_the_client_leaves_passes_on() -> None:
    a, _ = admission(max_in_flight=1)
    held = await a.enter("t", "interactive", 1)
    gone = asyncio.create_task(a.enter("u", "interactive", 1))
    after = asyncio.create_task(a.enter("v", "interactive", 1))
    await asyncio.sleep(0)
    a.leave(held)  # u's future is resolved, but u is cancelled before it runs
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):  # the cancellation wins; never a lost turn
        await gone
    ticket = await after
    assert ticket.tenant == "v" and a.in_flight == 1


@in_loop
async def test_a_waiter_that_leaves_lets_the_class_it_held_back_run() -> None:
    # 4 turns, 1 kept in reserve: t holds 2 (its share), u holds 1; t's next request waits,
    # and u's batch request waits behind it (a lower class never passes a waiting higher one).
    a = Admission("t", max_in_flight=4, max_queued=10, max_wait_s=5, reserved_turns=1)
    held = [await a.enter("t", "interactive", 1) for _ in range(2)]
    held.append(await a.enter("u", "interactive", 1))
    blocked = asyncio.create_task(a.enter("t", "interactive", 1))
    batch = asyncio.create_task(a.enter("u", "batch", 1))
    await asyncio.sleep(0)
    assert not blocked.done() and not batch.done()
    blocked.cancel()  # t's client leaves: u, below its share, may take the reserve now
    with pytest.raises(asyncio.CancelledError):
        await blocked
    ticket = await asyncio.wait_for(batch, 1)
    assert ticket.tenant == "u" and a.in_flight == 4
    for t in [*held, ticket]:
        a.leave(t)
    assert a.in_flight == 0


# -- turns kept for tenants below their fair share -----------------------------------------------


def fill(s: FairScheduler, tenant: str, now: float = 0.0) -> int:
    """Queue plenty for `tenant` and let in all the scheduler allows; how many ran."""
    for _ in range(20):
        s.push(entry(tenant))
    ran = 0
    while s.pop(now) is not None:
        ran += 1
    return ran


def test_a_tenant_alone_may_use_every_turn_reserve_included() -> None:
    s = FairScheduler(Turns(max_in_flight=8, reserved=2))
    assert fill(s, "heavy") == 8 and s.running == {"heavy": 8}


def test_the_reserve_goes_only_to_a_tenant_below_its_share() -> None:
    s = FairScheduler(Turns(max_in_flight=8, reserved=2, idle_after_s=10))
    fill(s, "heavy")
    s.push(entry("light"))
    for _ in range(2):
        s.release("heavy", 1.0)
    # the light tenant (0 of its share of 4) takes a freed turn; the heavy one (6 of 4) does not
    assert s.pop(1.0).tenant == "light"  # type: ignore[union-attr]
    assert s.pop(1.0) is None and s.held == 7
    s.release("light", 2.0)
    s.release("heavy", 2.0)
    # the light tenant still counts as active: the heavy one refills only the unreserved turns
    assert s.pop(3.0).tenant == "heavy" and s.pop(3.0) is None  # type: ignore[union-attr]
    assert s.running == {"heavy": 6}
    # so a light request that comes now runs at once, twice over
    s.push(entry("light"))
    s.push(entry("light"))
    assert [s.pop(4.0).tenant for _ in range(2)] == ["light", "light"]  # type: ignore[union-attr]


def test_a_tenant_idle_past_idle_after_no_longer_holds_the_reserve_back() -> None:
    s = FairScheduler(Turns(max_in_flight=8, reserved=2, idle_after_s=10))
    s.push(entry("light"))
    s.pop(0.0)
    s.release("light", 0.0)
    assert fill(s, "heavy", now=5.0) == 6  # light active: 2 turns kept
    assert s.share("heavy", 5.0) == 4
    s.push(entry("heavy"))
    assert s.pop(10.5) is not None and s.pop(10.5) is not None  # light forgotten
    assert s.running == {"heavy": 8} and s.share("heavy", 10.5) == 8


def test_shares_follow_the_weights() -> None:
    s = FairScheduler(Turns(max_in_flight=12, reserved=12), weights={"gold": 2.0})
    for _ in range(20):
        s.push(entry("gold"))
        s.push(entry("plain"))
    while s.pop(0.0) is not None:
        pass
    # all turns reserved: each tenant runs exactly up to its share, 8 and 4
    assert s.running == {"gold": 8, "plain": 4}
    assert s.share("newcomer", 0.0) == 3  # a fourth unit of weight


def test_the_reserve_never_lets_batch_ahead_of_waiting_interactive() -> None:
    s = FairScheduler(Turns(max_in_flight=4, reserved=2, idle_after_s=10))
    fill(s, "heavy")  # interactive, alone: all 4
    s.push(entry("light", "batch"))
    s.release("heavy", 1.0)
    s.release("heavy", 1.0)
    # heavy (interactive) is at its share of 2, light (batch) below it: the turns stay free
    # rather than let batch run while interactive waits
    assert s.pop(1.0) is None and s.length("batch") == 1
    s.push(entry("other"))  # an interactive tenant below its share takes one at once
    assert s.pop(1.0).tenant == "other"  # type: ignore[union-attr]


def test_giving_back_a_turn_not_held_is_refused() -> None:
    s = FairScheduler(Turns(max_in_flight=2))
    s.push(entry("a"))
    s.pop(0.0)
    s.release("a", 0.0)
    with pytest.raises(ValueError, match="holds no turn"):
        s.release("a", 0.0)
    assert s.running == {} and s.held == 0


def test_turns_are_validated() -> None:
    with pytest.raises(ValueError, match="reserved <= max_in_flight"):
        Turns(max_in_flight=2, reserved=3)


@pytest.mark.parametrize("seed", range(20))
def test_random_traffic_keeps_every_rule(seed: int) -> None:
    """Pushes, removals, pops and releases in random order: the bound, the reserve, the
    priority rule and the counts hold after every step."""
    rng = random.Random(seed)
    turns = Turns(max_in_flight=6, reserved=2, idle_after_s=3)
    s = FairScheduler(turns, weights={"t0": 2.0})
    held: list[str] = []
    waiting: list[Entry] = []
    now = 0.0
    for _ in range(400):
        now += rng.random() * 0.5
        action = rng.random()
        if action < 0.45:
            e = entry(f"t{rng.randrange(4)}", rng.choice(PRIORITIES), rng.randrange(1, 50))
            s.push(e)
            waiting.append(e)
        elif action < 0.55 and waiting:
            e = waiting.pop(rng.randrange(len(waiting)))
            assert s.remove(e)
        elif action < 0.8 and held:
            s.release(held.pop(rng.randrange(len(held))), now)
        else:
            busy_before = s.held
            best = next((p for p in PRIORITIES if s.length(p)), None)
            shares = {e.tenant: s.share(e.tenant, now) for e in waiting}
            running_before = dict(s.running)
            e = s.pop(now)
            if e is not None:
                waiting.remove(e)
                held.append(e.tenant)
                assert e.priority == best  # never a lower class while a higher one waits
                if busy_before >= turns.max_in_flight - turns.reserved:  # a reserved turn
                    assert running_before.get(e.tenant, 0) < shares[e.tenant]
        assert s.held == len(held) <= turns.max_in_flight
        assert all(n > 0 for n in s.running.values())
        assert Counter(held) == Counter(s.running)
        assert len(s) == len(waiting)


@in_loop
async def test_a_light_request_runs_at_once_beside_a_heavy_backlog_and_every_exit_frees() -> None:
    clock = [0.0]
    a = Admission("t", max_in_flight=4, max_queued=50, max_wait_s=0.05, reserved_turns=1,
                  clock=lambda: clock[0])  # fmt: skip
    light = await a.enter("light", "interactive", 1)  # the light tenant is active from now
    a.leave(light)
    heavy = [await a.enter("heavy", "interactive", 1) for _ in range(3)]
    backlog = [asyncio.create_task(a.enter("heavy", "interactive", 1)) for _ in range(5)]
    await asyncio.sleep(0)
    assert a.in_flight == 3 and len(a.scheduler) == 5  # the reserved turn stays free ...
    ticket = await a.enter("light", "interactive", 1)  # ... and the light request takes it
    assert ticket.waited_s == 0 and a.scheduler.running == {"heavy": 3, "light": 1}
    a.leave(ticket)
    a.leave(ticket)  # twice is once
    # a light request whose client leaves as it is let in gives the reserved turn back
    gone = asyncio.create_task(a.enter("light", "interactive", 1))
    await asyncio.sleep(0)
    gone.cancel()
    await left(gone, a)
    assert a.scheduler.running == {"heavy": 3}
    # the heavy backlog times out (0.05 s); the turns held are given back; nothing is left
    results = await asyncio.gather(*backlog, return_exceptions=True)
    assert all(isinstance(r, AdmissionRefused) for r in results)
    for t in heavy:
        a.leave(t)
    assert a.in_flight == 0 and a.scheduler.running == {} and len(a.scheduler) == 0


@in_loop
async def test_a_full_queue_still_lets_a_request_take_a_free_reserved_turn() -> None:
    a = Admission("t", max_in_flight=2, max_queued=1, max_wait_s=5, reserved_turns=1)
    light = await a.enter("light", "interactive", 1)
    a.leave(light)
    held = await a.enter("heavy", "interactive", 1)
    waiting = asyncio.create_task(a.enter("heavy", "interactive", 1))
    await asyncio.sleep(0)
    assert not waiting.done() and len(a.scheduler) == 1  # the queue is full
    with pytest.raises(AdmissionRefused, match="1 requests are already waiting"):
        await a.enter("heavy", "interactive", 1)
    ticket = await a.enter("light", "interactive", 1)  # runs: nothing to queue
    assert a.in_flight == 2
    waiting.cancel()
    a.leave(ticket)  # may hand the turn to `waiting` just as it is cancelled
    await left(waiting, a)
    a.leave(held)
    assert a.in_flight == 0 and len(a.scheduler) == 0


async def left(task: asyncio.Task[Ticket], a: Admission) -> None:
    """Await a cancelled entry; if its wait ended with a turn after all, the request leaves."""
    try:
        raced = await task
    except asyncio.CancelledError:
        return
    a.leave(raced)
