"""Admission to a tier: a bounded queue in front of its engines, by priority, fair across tenants.

A router replica lets at most `max_in_flight` requests of a tier run at once (a *turn* each);
the rest wait in the tier's queue, at most `max_queued` of them and each at most `max_wait_s`
(then 429 with `Retry-After`). Whenever a turn is free, the next request to run is:

1. from the highest priority class with anyone waiting (`interactive` before `batch`), so a
   batch request delays an interactive one by at most one slot's turn; a lower class never
   takes a turn while a higher one waits, not even a reserved one;
2. within the class, from the tenant that has been served the fewest tokens (virtual token
   counting: each tenant's counter grows by the tokens its requests use, divided by its
   weight; a tenant that starts waiting again is lifted to the smallest counter of those
   waiting, so idle time is not saved up as credit);
3. within the tenant, the oldest.

Order alone does not help a light tenant whose request finds every turn held by a heavy one: it
still waits for the next turn to free. So the last `reserved` of the `max_in_flight` turns are
kept for tenants below their fair share: `max_in_flight * weight / (sum of the weights of the
active tenants)`, a tenant being active while it has requests running or waiting and for
`idle_after_s` after its last one. A tenant at or above its share runs only while fewer than
`max_in_flight - reserved` turns are held; one below it may take any free turn, so a light
tenant's request runs at once. Alone, a tenant's share is every turn, so nothing is held back
from it; the reserve costs a flooding tenant `reserved` turns only while others are active.

`FairScheduler` decides (a pure value over the clock it is given, no asyncio); `Admission` is
the asyncio shell that parks requests on futures and hands out `Ticket`s. The clock is injected
for tests.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from ..errors import AdmissionRefused

Priority = Literal["interactive", "batch"]
PRIORITIES: tuple[Priority, ...] = ("interactive", "batch")  # first runs first


@dataclass(eq=False)
class Entry:
    """One waiting request."""

    tenant: str
    priority: Priority
    cost: float  # estimated tokens (prompt + asked output), charged when it is let in
    enqueued_at: float
    seq: int = 0


@dataclass(frozen=True)
class Turns:
    """How many requests run at once, and how many of those turns are kept for tenants below
    their fair share."""

    max_in_flight: int
    reserved: int = 0
    idle_after_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_in_flight < 1 or not 0 <= self.reserved <= self.max_in_flight:
            raise ValueError(f"need 0 <= reserved <= max_in_flight and max_in_flight >= 1: {self}")


@dataclass
class FairScheduler:
    """A tier's waiting requests and the turns held, per tenant."""

    turns: Turns = field(default_factory=lambda: Turns(max_in_flight=1))
    weights: dict[str, float] = field(default_factory=dict)  # tenant -> share (default 1)
    counters: dict[str, float] = field(default_factory=dict)
    running: dict[str, int] = field(default_factory=dict)  # tenant -> turns it holds (> 0)
    _last_seen: dict[str, float] = field(default_factory=dict)  # tenant -> its last turn's end
    _queues: dict[Priority, dict[str, deque[Entry]]] = field(
        default_factory=lambda: {p: {} for p in PRIORITIES}
    )
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    def __len__(self) -> int:
        return sum(self.length(p) for p in PRIORITIES)

    def length(self, priority: Priority) -> int:
        return sum(len(q) for q in self._queues[priority].values())

    @property
    def held(self) -> int:
        """Turns held, all tenants together."""
        return sum(self.running.values())

    def push(self, entry: Entry) -> None:
        tenants = self._queues[entry.priority]
        if entry.tenant not in tenants:
            waiting = [self.counters.get(t, 0.0) for t in tenants]
            floor = min(waiting) if waiting else self._least_counter()
            self.counters[entry.tenant] = max(self.counters.get(entry.tenant, 0.0), floor)
            tenants[entry.tenant] = deque()
        entry.seq = next(self._seq)
        tenants[entry.tenant].append(entry)

    def _least_counter(self) -> float:
        """Where a tenant joining an empty queue starts: not below anyone still counted."""
        return min(self.counters.values()) if self.counters else 0.0

    def pop(self, now: float) -> Entry | None:
        """The next request to run, if a turn is free for it; it then holds that turn."""
        held = self.held
        if held >= self.turns.max_in_flight:
            return None
        for priority in PRIORITIES:
            tenants = self._queues[priority]
            if not tenants:
                continue
            allowed = list(tenants)
            if held >= self.turns.max_in_flight - self.turns.reserved:  # only the reserve is left
                total = self._active_weight(now)  # every waiting tenant is among the active
                allowed = [t for t in allowed if self.running.get(t, 0) < self._due(t, total)]
            if not allowed:
                return None  # a lower class never runs while a higher one waits
            tenant = min(allowed, key=lambda t: (self.counters.get(t, 0.0), tenants[t][0].seq))
            entry = tenants[tenant].popleft()
            if not tenants[tenant]:
                del tenants[tenant]
            self.running[tenant] = self.running.get(tenant, 0) + 1
            self.charge(tenant, entry.cost)
            return entry
        return None

    def release(self, tenant: str, now: float) -> None:
        """A turn comes back (its request ended); giving back a turn not held is a bug."""
        held = self.running.get(tenant, 0)
        if held <= 0:
            raise ValueError(f"tenant {tenant!r} holds no turn to give back")
        if held == 1:
            del self.running[tenant]
        else:
            self.running[tenant] = held - 1
        self._last_seen[tenant] = now

    def share(self, tenant: str, now: float) -> float:
        """The turns `tenant` is due: `max_in_flight` split by weight over the active tenants."""
        active = self._active(now)
        extra = 0.0 if tenant in active else self.weights.get(tenant, 1.0)
        return self._due(tenant, self._active_weight(now) + extra)

    def _due(self, tenant: str, active_weight: float) -> float:
        return self.turns.max_in_flight * self.weights.get(tenant, 1.0) / active_weight

    def _active_weight(self, now: float) -> float:
        return sum(self.weights.get(t, 1.0) for t in self._active(now))

    def _active(self, now: float) -> set[str]:
        since = now - self.turns.idle_after_s
        for t in [t for t, seen in self._last_seen.items() if seen < since]:
            del self._last_seen[t]  # forgotten: it counts again once it asks again
        waiting = {t for tenants in self._queues.values() for t in tenants}
        return waiting | set(self.running) | set(self._last_seen)

    def remove(self, entry: Entry) -> bool:
        """Take a waiting entry out (it timed out or its client left); False if not waiting."""
        tenants = self._queues[entry.priority]
        queue = tenants.get(entry.tenant)
        if queue is None or entry not in queue:
            return False
        queue.remove(entry)
        if not queue:
            del tenants[entry.tenant]
        return True

    def charge(self, tenant: str, tokens: float) -> None:
        """Count tokens served to a tenant (negative to correct an estimate)."""
        weight = self.weights.get(tenant, 1.0)
        self.counters[tenant] = self.counters.get(tenant, 0.0) + tokens / weight


@dataclass(eq=False)
class Ticket:
    """A request let in; `Admission.leave` it exactly once, however the request ends."""

    tenant: str
    priority: Priority
    cost: float
    waited_s: float
    left: bool = False


class Admission:
    def __init__(
        self,
        tier: str,
        *,
        max_in_flight: int,
        max_queued: int,
        max_wait_s: float,
        reserved_turns: int = 0,
        idle_after_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, Priority, int], None] | None = None,
    ) -> None:
        self.tier = tier
        self.scheduler = FairScheduler(Turns(max_in_flight, reserved_turns, idle_after_s))
        self._max_queued = max_queued
        self._max_wait_s = max_wait_s
        self._clock = clock
        self._waiting: dict[Entry, asyncio.Future[None]] = {}
        self._on_change = on_change

    @property
    def in_flight(self) -> int:
        return self.scheduler.held

    @property
    def queued(self) -> int:
        return len(self.scheduler)

    async def enter(
        self, tenant: str, priority: Priority, cost: float, weight: float = 1.0
    ) -> Ticket:
        """Wait for a turn; `AdmissionRefused` if the queue is full or the wait too long."""
        now = self._clock()
        self.scheduler.weights[tenant] = weight
        entry = Entry(tenant, priority, cost, now)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[entry] = future
        self.scheduler.push(entry)
        self._dispatch()
        if future.done():  # a turn was free for it
            return Ticket(tenant, priority, cost, 0.0)
        if len(self.scheduler) > self._max_queued:
            self._waiting.pop(entry)
            self.scheduler.remove(entry)
            self._dispatch()  # a request it held back (a higher class) may go now
            raise self._refused(f"{len(self.scheduler)} requests are already waiting")
        self._changed(priority)
        try:
            async with asyncio.timeout(self._max_wait_s):  # passes on a cancellation, always
                await future
        except TimeoutError:
            self._give_up(entry)
            raise self._refused(f"no turn within {self._max_wait_s:g}s") from None
        except asyncio.CancelledError:  # the client went away while waiting
            self._give_up(entry)
            raise
        return Ticket(tenant, priority, cost, self._clock() - now)

    def _give_up(self, entry: Entry) -> None:
        self._waiting.pop(entry, None)
        if self.scheduler.remove(entry):  # still waiting: nobody let it in
            self._changed(entry.priority)
            self._dispatch()  # a request it held back (a higher class) may go now
        else:  # let in just as it gave up: its turn passes on
            self.scheduler.release(entry.tenant, self._clock())
            self._dispatch()

    def leave(self, ticket: Ticket, tokens: float | None = None) -> None:
        """The request ended; `tokens` it really used, when known, correct the estimate."""
        if ticket.left:
            return
        ticket.left = True
        if tokens is not None:
            self.scheduler.charge(ticket.tenant, tokens - ticket.cost)
        self.scheduler.release(ticket.tenant, self._clock())
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand every free turn the scheduler allows to the request it picks."""
        while (entry := self.scheduler.pop(self._clock())) is not None:
            self._changed(entry.priority)
            future = self._waiting.pop(entry, None)
            if future is None or future.done():  # cannot happen: a gone entry is removed
                self.scheduler.release(entry.tenant, self._clock())
                continue
            future.set_result(None)

    def _changed(self, priority: Priority) -> None:
        if self._on_change is not None:
            self._on_change(self.tier, priority, self.scheduler.length(priority))

    def _refused(self, why: str) -> AdmissionRefused:
        retry = max(1, math.ceil(self._max_wait_s))
        return AdmissionRefused(
            f"tier {self.tier!r} is at capacity: {why}; retry in {retry}s", retry_after_s=retry
        )
