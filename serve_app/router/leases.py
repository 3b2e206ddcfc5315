"""Engine leases, the direct data path's one concept: where a lease is taken, kept, and given back.

A replica of the tier leases its engine to a request (`ReplicaLeases`, behind
`TierDeployment.lease`): it answers with the engine's address and key (`EngineLease`) and holds
the Ray call open until the router cancels it. Serve still picks the replica (its queue,
`max_ongoing_requests`, the replica-wait bound, the tier's replica choice) and counts the
request there for as long as the lease is held; the answer goes engine → router over one HTTP
connection instead of through the replica and two Ray streaming hops. On the router, a
request's `LeasedCalls` looks to the dispatcher like any tier call (first `None` once a replica
has taken it, then the items; `cancel` ends it), so the engine-busy retry, cancellation on
disconnect and accounting work as on the relay path. `TierLeases` starts those calls on a kept
lease or a fresh one.

Kept leases (`LeaseKeeper`). Taking a lease is a Ray call through Serve's replica choice, and
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
lease goes back at that moment, one in use when its request ends. An engine that refuses a
connection takes every lease on it back.

A request after a pause would find nothing kept and pay the Ray call, and with several router
replicas behind one load balancer a lone client's requests land on each router only every few
seconds. So for `lease_spare_s` after this router's last request of the tier, the newest lease
that would go back (idle, or too old after a long answer) stays as a spare, and is renewed (a
fresh lease taken, then the old one given back) before it is `lease_reuse_s` old, at once if
it is older: a draining replica still sees no new request on it after `lease_reuse_s`. A spare
its replica asks back goes back and is not renewed.

Time is read through an injected `clock`, and the keeper's timers go through `Timers`, so that
expiry, renewal and loss are decided the same way under a test's hand-driven clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from ..engine.client import EngineReply
from ..errors import EngineUnreachable, TierUnavailable
from ..tier.call import TierCall

T = TypeVar("T")

RENEW_AT = 0.75  # of `lease_reuse_s`: when a spare lease is renewed
# What a spare lease asks of its replica: the replica reads only the route (its span's name).
SPARE = TierCall("/v1/chat/completions", {}, stream=True, max_tokens=0, prompt_chars=0)


@dataclass(frozen=True)
class EngineLease:
    """A replica's answer to `lease`: where its engine listens and the key it takes. The
    replica counts the request as its own (Serve's ongoing requests, drain on scale-down)
    until the router cancels the lease; the router talks to the engine itself."""

    url: str
    api_key: str = field(repr=False)
    # The replica's span context (`serve_app.tracing`), for the engine request; empty when off.
    trace: Mapping[str, str] = field(default_factory=dict)


class GrantCall(Protocol):
    """Serve's call to `TierDeployment.lease` (its response generator): the engine's
    `EngineLease`, then nothing until cancelled; a second item, `None`, asks the lease back."""

    def __anext__(self) -> Awaitable[EngineLease | None]: ...
    def cancel(self) -> None: ...


class Timer(Protocol):
    def cancel(self) -> None: ...


class Timers(Protocol):
    """Calls `callback` once `delay` seconds have passed on the keeper's clock."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer: ...


class LoopTimers:
    """The running event loop's timers: its clock and `time.monotonic` agree."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(delay, callback)


LOOP_TIMERS = LoopTimers()


def reusable_after(reply: EngineReply) -> bool:
    """A whole answer after which its engine may take the lease's next request: not a server
    error, not the engine's 429 (at capacity: the retry asks Serve afresh)."""
    return reply.status < 500 and reply.status != 429


# -- the replica's side ----------------------------------------------------------------------


class ReplicaLeases:
    """The leases one replica has granted on its engine (`TierDeployment.lease`). Each is held
    until the router cancels it, or for `hold_s` at most (the longest request, plus
    `lease_reuse_s` while a router keeps it). Where routers keep leases (`kept`), a grant that
    takes the replica's last slot (`slots`, Serve's `max_ongoing_requests`) asks every held
    lease back: requests may be waiting in Serve for a slot here. `on_count` hears the number
    held after every change (a gauge)."""

    def __init__(
        self,
        slots: int,
        hold_s: float,
        kept: bool,
        on_count: Callable[[int], None] = lambda held: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._slots = slots
        self._hold_s = hold_s
        self._kept = kept
        self._on_count = on_count
        self._clock = clock
        self._full = asyncio.Event()
        self.held = 0

    async def grant(self, engine: EngineLease) -> AsyncIterator[EngineLease | None]:
        """`engine`, then (kept leases only) `None` once every slot is leased, then nothing
        until the call is cancelled or `hold_s` has passed."""
        self._count(+1)
        if self._kept and self.held >= self._slots:
            self._full.set()  # wakes the leases waiting now; later ones wait for the next time
            self._full.clear()
        try:
            yield engine
            hold = self._hold_s
            if self._kept:
                hold = await self._until_full(hold)
                if hold > 0:
                    # Every slot is leased, so requests may be waiting in Serve for one here:
                    # the router gives this lease back after its request instead of keeping
                    # it, and the waiting requests get the slots in Serve's order.
                    yield None
            await asyncio.sleep(hold)
        finally:
            self._count(-1)

    async def _until_full(self, hold: float) -> float:
        """Wait up to `hold` for every slot to be leased; what is left of `hold` then (0: never
        full)."""
        deadline = self._clock() + hold
        try:
            async with asyncio.timeout(hold):
                await self._full.wait()
        except TimeoutError:
            return 0.0
        return max(deadline - self._clock(), 1e-3)

    def _count(self, change: int) -> None:
        self.held += change
        self._on_count(self.held)


# -- the router's side -----------------------------------------------------------------------


class Lease:
    """A lease a replica granted: Serve's call (`TierDeployment.lease`'s response generator),
    what the replica answered, and when."""

    def __init__(self, call: GrantCall, engine: EngineLease, granted_at: float) -> None:
        self.call = call
        self.engine = engine
        self.granted_at = granted_at
        self._ended: asyncio.Future[EngineLease | None] | None = None
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
            self._ended = asyncio.ensure_future(anext(self.call, None))  # type: ignore[call-overload]
            self._ended.add_done_callback(self._finished)

    def _finished(self, future: asyncio.Future[EngineLease | None]) -> None:
        if not future.cancelled():
            with contextlib.suppress(BaseException):
                future.exception()
        if self._on_end is not None:
            self._on_end(self)

    def end(self) -> None:
        self.call.cancel()


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
        timers: Timers = LOOP_TIMERS,
    ) -> None:
        self._reuse_s = reuse_s
        self._idle_s = idle_s
        self._clock = clock
        self._timers = timers
        self._spare_s = spare_s if grant is not None else 0.0
        self._grant = grant
        self._kept: list[tuple[Lease, float]] = []  # (lease, kept since), oldest first
        self._timer: Timer | None = None
        self._spare: Lease | None = None
        self._renewal: Timer | None = None
        self._renewing: asyncio.Future[Lease] | None = None
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
            self._timer = self._timers.call_later(self._idle_s, self._expire)

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
            self._timer = self._timers.call_later(wait, self._expire)

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
        self._renewal = self._timers.call_later(wait, self._renew)

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
        """Take a fresh lease to replace the spare; no replica has `reuse_s` to give one."""
        self._renewal = None
        spare = self._spare
        if spare is None or self._renewing is not None:
            return
        if self._clock() - self._used >= self._spare_s:  # no request for `spare_s`: give it back
            self._drop_spare()
            spare.end()
            return
        assert self._grant is not None
        renewing = self._renewing = asyncio.ensure_future(self._grant())
        give_up = self._timers.call_later(self._reuse_s, renewing.cancel)
        renewing.add_done_callback(functools.partial(self._renewed, spare, give_up))

    def _renewed(self, old: Lease, give_up: Timer, renewing: asyncio.Future[Lease]) -> None:
        """Give the spare `old` back now that a fresh lease replaces it (also when none came
        within `reuse_s`, or the tier failed it: the tier is saturated or has no replica). A
        fresh lease is not kept if its replica ended `old` or asked it back meanwhile."""
        give_up.cancel()
        self._renewing = None
        fresh = None
        if not renewing.cancelled() and renewing.exception() is None:
            fresh = renewing.result()
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


class LeasedCalls(Generic[T]):
    """A lease and the engine call started on it. The lease is either granted afresh (`call`,
    Serve's response generator of `TierDeployment.lease`) or one the router kept (`kept`).
    `cancel` closes the engine call and gives the lease back, or, when the engine call ended
    cleanly and the tier keeps leases, hands it to the `keeper`.

    Cleanly means: the engine's stream ran to its end, or an item for which `finished` holds
    (a whole answer that is neither a server error nor the engine's 429: `reusable_after`)."""

    def __init__(
        self,
        start: Callable[[EngineLease], AsyncIterator[T]],
        tier: str,
        *,
        call: GrantCall | None = None,
        kept: Lease | None = None,
        keeper: LeaseKeeper | None = None,
        finished: Callable[[T], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        granted = kept.call if kept is not None else call
        assert granted is not None, "a lease call, or a kept lease"
        self._call = granted
        self._lease = kept
        self._start = start
        self._tier = tier
        self._keeper = keeper
        self._finished = finished
        self._clock = clock
        self._items: AsyncIterator[T] | None = None
        self._clean = False
        self._released = False
        self._closing: asyncio.Future[None] | None = None

    def __anext__(self) -> Awaitable[T | None]:
        return self._next()

    async def _next(self) -> T | None:
        if self._items is not None:
            try:
                item = await anext(self._items)
            except StopAsyncIteration:
                self._clean = True
                raise
            except EngineUnreachable:
                if self._keeper is not None and self._lease is not None:
                    self._keeper.forget(self._lease.engine.url)  # its other leases are as dead
                raise
            if self._finished is not None and self._finished(item):
                self._clean = True
            return item
        if self._lease is None:
            engine: EngineLease | None = await anext(self._call, None)  # type: ignore[call-overload]
            if engine is None:
                raise TierUnavailable(f"a replica of tier {self._tier!r} gave no engine; retry")
            self._lease = Lease(self._call, engine, self._clock())
            if self._keeper is not None:
                self._lease.watch()  # the replica may ask for it back (every slot leased)
        self._items = self._start(self._lease.engine)
        return None

    def cancel(self) -> None:
        if not self._released:
            self._released = True
            if self._clean and self._keeper is not None and self._lease is not None:
                self._keeper.keep(self._lease)
            else:
                self._call.cancel()
        if self._items is not None and self._closing is None and not self._clean:
            self._closing = asyncio.ensure_future(self._close(self._items))

    @staticmethod
    async def _close(items: AsyncIterator[T]) -> None:
        with contextlib.suppress(RuntimeError):  # still running: its own cancellation closes it
            await items.aclose()  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Keeping:
    """How a router keeps one tier's leases (the tier's `lease_*` settings)."""

    reuse_s: float
    idle_s: float
    spare_s: float = 0.0


class TierLeases:
    """A router's leases of one tier: each request's `LeasedCalls` starts on a kept lease, or
    on a fresh one from `ask` (the transport's call to `TierDeployment.lease`, for this
    request's `TierCall`). With `keeping`, leases whose requests ended cleanly are kept
    (`keeper`), and a spare is renewed with leases asked for no request (`SPARE`)."""

    def __init__(
        self,
        tier: str,
        ask: Callable[[TierCall], GrantCall],
        keeping: Keeping | None = None,
        clock: Callable[[], float] = time.monotonic,
        timers: Timers = LOOP_TIMERS,
    ) -> None:
        self._tier = tier
        self._ask = ask
        self._clock = clock
        self.keeper: LeaseKeeper | None = None
        if keeping is not None:
            spare_s, grant = keeping.spare_s, self._spare
            self.keeper = LeaseKeeper(
                keeping.reuse_s, keeping.idle_s, clock, spare_s=spare_s, grant=grant, timers=timers
            )

    def calls(
        self,
        call: TierCall,
        start: Callable[[EngineLease], AsyncIterator[T]],
        finished: Callable[[T], bool] | None = None,
    ) -> LeasedCalls[T]:
        """`call`'s engine call, `start`ed on its lease once a replica has granted one."""
        keeper = self.keeper
        kept = keeper.take() if keeper is not None else None
        clock = self._clock
        if kept is not None:
            return LeasedCalls(
                start, self._tier, kept=kept, keeper=keeper, finished=finished, clock=clock
            )
        grant = self._ask(call)
        return LeasedCalls(
            start, self._tier, call=grant, keeper=keeper, finished=finished, clock=clock
        )

    def close(self) -> None:
        if self.keeper is not None:
            self.keeper.close()

    async def _spare(self) -> Lease:
        """A fresh lease for no request yet: the keeper's spare."""
        call = self._ask(SPARE)
        try:
            engine: EngineLease | None = await anext(call, None)  # type: ignore[call-overload]
        except BaseException:
            call.cancel()
            raise
        if engine is None:
            call.cancel()
            raise TierUnavailable(f"a replica of tier {self._tier!r} gave no engine")
        return Lease(call, engine, self._clock())
