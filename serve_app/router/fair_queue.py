"""Admission to a tier: a bounded queue in front of its engines, by priority, fair across tenants.

A router replica lets at most `max_in_flight` requests of a tier run at once; the rest wait in
the tier's queue, at most `max_queued` of them and each at most `max_wait_s` (then 429 with
`Retry-After`). When a request ends, the next one to run is:

1. from the highest priority class with anyone waiting (`interactive` before `batch`), so a
   batch request delays an interactive one by at most one slot's turn;
2. within the class, from the tenant that has been served the fewest tokens (virtual token
   counting: each tenant's counter grows by the tokens its requests use, divided by its
   weight; a tenant that starts waiting again is lifted to the smallest counter of those
   waiting, so idle time is not saved up as credit);
3. within the tenant, the oldest.

`FairScheduler` decides (a pure value, no asyncio); `Admission` is the asyncio shell that parks
requests on futures and hands out `Ticket`s. The clock is injected for tests.
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


@dataclass
class FairScheduler:
    weights: dict[str, float] = field(default_factory=dict)  # tenant -> share (default 1)
    counters: dict[str, float] = field(default_factory=dict)
    _queues: dict[Priority, dict[str, deque[Entry]]] = field(
        default_factory=lambda: {p: {} for p in PRIORITIES}
    )
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    def __len__(self) -> int:
        return sum(self.length(p) for p in PRIORITIES)

    def length(self, priority: Priority) -> int:
        return sum(len(q) for q in self._queues[priority].values())

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

    def pop(self) -> Entry | None:
        for priority in PRIORITIES:
            tenants = self._queues[priority]
            if not tenants:
                continue
            tenant = min(tenants, key=lambda t: (self.counters.get(t, 0.0), tenants[t][0].seq))
            entry = tenants[tenant].popleft()
            if not tenants[tenant]:
                del tenants[tenant]
            self.charge(entry.tenant, entry.cost)
            return entry
        return None

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
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, Priority, int], None] | None = None,
    ) -> None:
        self.tier = tier
        self.in_flight = 0
        self.scheduler = FairScheduler()
        self._max_in_flight = max_in_flight
        self._max_queued = max_queued
        self._max_wait_s = max_wait_s
        self._clock = clock
        self._waiting: dict[Entry, asyncio.Future[None]] = {}
        self._on_change = on_change

    async def enter(
        self, tenant: str, priority: Priority, cost: float, weight: float = 1.0
    ) -> Ticket:
        """Wait for a turn; `AdmissionRefused` if the queue is full or the wait too long."""
        now = self._clock()
        self.scheduler.weights[tenant] = weight
        if self.in_flight < self._max_in_flight and not self.scheduler:
            self.in_flight += 1
            self.scheduler.charge(tenant, cost)
            return Ticket(tenant, priority, cost, 0.0)
        if len(self.scheduler) >= self._max_queued:
            raise self._refused(f"{len(self.scheduler)} requests are already waiting")
        entry = Entry(tenant, priority, cost, now)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[entry] = future
        self.scheduler.push(entry)
        self._changed(priority)
        try:
            await asyncio.wait_for(future, self._max_wait_s)
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
        else:  # let in just as it gave up: its turn passes on
            self.in_flight -= 1
            self._dispatch()

    def leave(self, ticket: Ticket, tokens: float | None = None) -> None:
        """The request ended; `tokens` it really used, when known, correct the estimate."""
        if ticket.left:
            return
        ticket.left = True
        if tokens is not None:
            self.scheduler.charge(ticket.tenant, tokens - ticket.cost)
        self.in_flight -= 1
        self._dispatch()

    def _dispatch(self) -> None:
        while self.in_flight < self._max_in_flight:
            entry = self.scheduler.pop()
            if entry is None:
                return
            self._changed(entry.priority)
            future = self._waiting.pop(entry, None)
            if future is None or future.done():
                continue
            self.in_flight += 1
            future.set_result(None)

    def _changed(self, priority: Priority) -> None:
        if self._on_change is not None:
            self._on_change(self.tier, priority, self.scheduler.length(priority))

    def _refused(self, why: str) -> AdmissionRefused:
        retry = max(1, math.ceil(self._max_wait_s))
        return AdmissionRefused(
            f"tier {self.tier!r} is at capacity: {why}; retry in {retry}s", retry_after_s=retry
        )
