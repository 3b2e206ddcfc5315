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

A request after a pause would find nothing kept and pay the Ray call, and with several router
replicas behind one load balancer a lone client's requests land on each router only every few
seconds. So for `lease_spare_s` after this router's last request of the tier, the newest lease
that would go back (idle, or too old after a long answer) stays as a spare, and is renewed (a
fresh lease taken, then the old one given back) before it is `lease_reuse_s` old, at once if
it is older: a draining replica still sees no new request on it after `lease_reuse_s`. A spare
its replica asks back goes back and is not renewed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable
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


RENEW_AT = 0.75  # of `lease_reuse_s`: when a spare lease is renewed


class LeaseKeeper:
    """The leases one router keeps for one tier, newest handed out first: when demand falls,
    the oldest stay unused and are given back after `idle_s`, but the newest of them may stay
    as the spare (`spare_s`; `grant` takes a fresh lease from the tier to renew it)."""

    def __init__(
        self,
        reuse_s: float,
        idle_s: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        spare_s: float = 0.0,
        grant: Callable[[], Awaitable[Lease]] | None = None,
    ) -> None:
        self._reuse_s = reuse_s
        self._idle_s = idle_s
        self._clock = clock
        self._spare_s = spare_s if grant is not None else 0.0
        self._grant = grant
        self._kept: list[tuple[Lease, float]] = []  # (lease, kept since), oldest first
        self._timer: asyncio.TimerHandle | None = None
        self._spare: Lease | None = None
        self._renewal: asyncio.TimerHandle | None = None
        self._renewing: asyncio.Future[None] | None = None
        self._used = -math.inf  # when a request last took or brought back a lease
        self._closed = False

    def __len__(self) -> int:
        return len(self._kept) + (self._spare is not None)

    @property
    def spare(self) -> Lease | None:
        return self._spare

    def take(self) -> Lease | None:
        """A kept lease for a new request, or None: take one from the replica."""
        now = self._used = self._clock()
        while self._kept:
            lease, since = self._kept.pop()
            if self._usable(lease, since, now):
                return lease
            lease.end()
        spare = self._drop_spare()
        if spare is not None and spare.alive and now - spare.granted_at < self._reuse_s:
            return spare
        if spare is not None:
            spare.end()
        return None

    def keep(self, lease: Lease) -> None:
        """A lease whose request ended cleanly: kept for the next request, or given back."""
        now = self._used = self._clock()
        lease.watch(self._ended)
        if self._closed or not self._usable(lease, now, now):
            # Too old to hand out (a long answer outlived `reuse_s`): it may still seed the
            # spare, renewed at once, so that a request after a pause finds a fresh lease.
            if not self._offer_spare(lease, now):
                lease.end()
            return
        self._kept.append((lease, now))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._idle_s, self._expire)

    def forget(self, url: str) -> None:
        """Give back every kept lease on the engine at `url`, the spare too: it refused a
        connection (it exited; its replica is going), so none of them can serve a request."""
        if self._spare is not None and self._spare.engine.url == url:
            self._drop_spare_and_end()
        kept = []
        for lease, since in self._kept:
            if lease.engine.url == url:
                lease.end()
            else:
                kept.append((lease, since))
        self._kept = kept

    def close(self) -> None:
        """Give every kept lease back, the spare too, and renew nothing more."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._renewing is not None:
            self._renewing.cancel()
        self._drop_spare_and_end()
        while self._kept:
            self._kept.pop()[0].end()

    def _ended(self, lease: Lease) -> None:
        """The replica ended a lease or asked it back: if it is waiting here, give it back now
        (a replica whose every slot is leased may have requests waiting for one)."""
        if lease is self._spare:
            self._drop_spare()
            lease.end()
            return
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
            elif not self._offer_spare(lease, now):
                lease.end()
        self._kept = fresh
        if fresh:
            wait = max(0.0, fresh[0][1] + self._idle_s - now) + 0.001
            self._timer = asyncio.get_running_loop().call_later(wait, self._expire)

    # The spare: one lease kept through a pause, renewed before `reuse_s`.

    def _offer_spare(self, lease: Lease, now: float) -> bool:
        """Keep `lease`, gone idle or too old to hand out, as the spare if one is wanted and it
        is the youngest; one past its renewal time is renewed at once."""
        recent = now - self._used < self._spare_s
        if self._closed or not recent or not lease.alive:
            return False
        if self._spare is not None and self._spare.granted_at >= lease.granted_at:
            return False
        self._drop_spare_and_end()
        self._spare = lease
        self._renew_later(lease, now)
        return True

    def _renew_later(self, spare: Lease, now: float) -> None:
        wait = max(0.0, spare.granted_at + RENEW_AT * self._reuse_s - now)
        self._renewal = asyncio.get_running_loop().call_later(wait, self._renew)

    def _drop_spare_and_end(self) -> None:
        spare = self._drop_spare()
        if spare is not None:
            spare.end()

    def _drop_spare(self) -> Lease | None:
        spare, self._spare = self._spare, None
        if self._renewal is not None:
            self._renewal.cancel()
            self._renewal = None
        return spare

    def _renew(self) -> None:
        self._renewal = None
        spare = self._spare
        if spare is None or self._renewing is not None:
            return
        if self._clock() - self._used >= self._spare_s:  # no request for `spare_s`: give it back
            self._drop_spare()
            spare.end()
            return
        self._renewing = asyncio.ensure_future(self._renewed(spare))

    async def _renewed(self, old: Lease) -> None:
        """Take a fresh lease to replace the spare `old`, then give `old` back (also when none
        came within `reuse_s`: the tier is saturated or has no replica). A fresh lease is not
        kept if its replica ended `old` or asked it back meanwhile."""
        assert self._grant is not None
        fresh: Lease | None = None
        try:
            fresh = await asyncio.wait_for(self._grant(), self._reuse_s)
        except Exception:  # no replica took it in time, or the tier failed it: no spare
            fresh = None
        finally:
            self._renewing = None
        wanted = old.alive
        if old is self._spare:  # not taken by a request meanwhile
            self._drop_spare()
            old.end()
        if fresh is not None:
            fresh.watch(self._ended)
            if not (wanted and self._offer_spare(fresh, self._clock())):
                fresh.end()
        # A spare that went idle while this ran found its renewal taken: renew it now.
        if self._spare is not None and self._renewal is None and not self._closed:
            self._renew_later(self._spare, self._clock())
