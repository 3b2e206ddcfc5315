"""Engine leases a router keeps between requests (the direct data path).

Taking a lease (`TierDeployment.lease`) is a Ray call through Serve's replica choice, and
giving it back is another: together about 2.8 ms before the first byte reaches the engine on
2 cores, and about a sixth of a router's CPU for short answers. A request whose engine call ended
cleanly therefore hands its lease to the next request of the same tier that reaches this
router within `lease_idle_s`, for as long as the lease is younger than `lease_reuse_s`.

One lease still carries one request at a time, so a replica never has more requests than Serve
counts on it (`max_ongoing_requests`), and a replica being drained sees no new request on a
kept lease once `lease_reuse_s` has passed. What a kept request skips is the replica choice
itself: it goes where its predecessor went. A replica that ends a lease (it stopped or died)
ends the Ray call, and a kept lease whose call has ended is never handed out. A replica whose
every slot is leased (`max_ongoing_requests`) asks for its leases back: requests may be waiting
in Serve for a slot there, and they get the slots in Serve's order, not this router's. A kept
lease goes back at that moment, one in use when its request ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from ..tier.call import EngineLease


class Lease:
    """A lease a replica granted: Serve's call (`TierDeployment.lease`'s response generator),
    what the replica answered, and when."""

    def __init__(self, call: Any, engine: EngineLease, granted_at: float) -> None:
        self.call = call
        self.engine = engine
        self.granted_at = granted_at
        self._ended: asyncio.Future[Any] | None = None
        self._on_end: Callable[[Lease], None] | None = None

    @property
    def alive(self) -> bool:
        """False once the replica has ended the call (stopped, died, or its hold ran out) or
        asked for the lease back (every slot of it leased: requests may be waiting for one)."""
        return self._ended is None or not self._ended.done()

    def watch(self, on_end: Callable[[Lease], None] | None = None) -> None:
        """Read the call's next item in the background: it completes only when the replica
        ends the call or asks for the lease back, and then calls `on_end` (the latest one
        given) with this lease."""
        if on_end is not None:
            self._on_end = on_end
        if self._ended is None:
            self._ended = asyncio.ensure_future(anext(self.call, None))
            self._ended.add_done_callback(self._finished)

    def _finished(self, future: asyncio.Future[Any]) -> None:
        if not future.cancelled():
            with contextlib.suppress(BaseException):
                future.exception()
        if self._on_end is not None:
            self._on_end(self)

    def end(self) -> None:
        self.call.cancel()


class LeaseKeeper:
    """The leases one router keeps for one tier, newest handed out first: when demand falls,
    the oldest stay unused and are given back after `idle_s`."""

    def __init__(
        self, reuse_s: float, idle_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._reuse_s = reuse_s
        self._idle_s = idle_s
        self._clock = clock
        self._kept: list[tuple[Lease, float]] = []  # (lease, kept since), oldest first
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._kept)

    def take(self) -> Lease | None:
        """A kept lease for a new request, or None: take one from the replica."""
        now = self._clock()
        while self._kept:
            lease, since = self._kept.pop()
            if self._usable(lease, since, now):
                return lease
            lease.end()
        return None

    def keep(self, lease: Lease) -> None:
        """A lease whose request ended cleanly: kept for the next request, or given back."""
        now = self._clock()
        if not self._usable(lease, now, now):
            lease.end()
            return
        lease.watch(self._ended)
        self._kept.append((lease, now))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._idle_s, self._expire)

    def close(self) -> None:
        """Give every kept lease back."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._kept:
            self._kept.pop()[0].end()

    def _ended(self, lease: Lease) -> None:
        """The replica ended a lease or asked it back: if it is waiting here, give it back now
        (a replica whose every slot is leased may have requests waiting for one)."""
        for i, (kept, _) in enumerate(self._kept):
            if kept is lease:
                del self._kept[i]
                lease.end()
                return

    def _usable(self, lease: Lease, since: float, now: float) -> bool:
        fresh = now - lease.granted_at < self._reuse_s
        return lease.alive and fresh and now - since <= self._idle_s

    def _expire(self) -> None:
        self._timer = None
        now = self._clock()
        fresh = []
        for lease, since in self._kept:
            if self._usable(lease, since, now):
                fresh.append((lease, since))
            else:
                lease.end()
        self._kept = fresh
        if fresh:
            wait = max(0.0, fresh[0][1] + self._idle_s - now) + 0.001
            self._timer = asyncio.get_running_loop().call_later(wait, self._expire)
