"""The direct data path: a replica of the tier leases its engine to the request, and the router
talks to that engine itself.

Serve still picks the replica (its queue, `max_ongoing_requests`, the replica-wait bound, the
tier's replica choice) and counts the request there for as long as the lease is held; the
answer's chunks go engine → router over one HTTP connection instead of through the replica and
two Ray streaming hops. `LeasedCalls` looks to the dispatcher like any tier call (first `None`
once a replica has taken it, then the items; `cancel` ends it), so the engine-busy retry,
cancellation on disconnect and accounting work as on the relay path.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, TypeVar

from ..engine.client import EngineReply
from ..engine.pool import EnginePool, EngineRequest
from ..engine.sse import Batch
from ..errors import EngineUnreachable, TierUnavailable
from ..tier.call import EngineLease, TierCall
from .leases import Lease, LeaseKeeper

T = TypeVar("T")


class LeasedCalls(Generic[T]):
    """A lease and the engine call started on it. The lease is either granted afresh (`call`,
    Serve's response generator of `TierDeployment.lease`) or one the router kept (`kept`, see
    `serve_app.router.leases`). `cancel` closes the engine call and gives the lease back, or,
    when the engine call ended cleanly and the tier keeps leases, hands it to the `keeper`.

    Cleanly means: the engine's stream ran to its end, or an item for which `finished` holds
    (a whole answer that is neither a server error nor the engine's 429)."""

    def __init__(
        self,
        start: Callable[[EngineLease], AsyncIterator[T]],
        tier: str,
        *,
        call: Any = None,
        kept: Lease | None = None,
        keeper: LeaseKeeper | None = None,
        finished: Callable[[T], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._call = kept.call if kept is not None else call
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
            engine: EngineLease | None = await anext(self._call, None)
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


class EngineCalls:
    """What the router sends to a leased engine, with the tier's time bound."""

    def __init__(self, pool: EnginePool, timeout_s: float) -> None:
        self._pool = pool
        self._timeout_s = timeout_s

    @staticmethod
    def finished(reply: EngineReply) -> bool:
        """A whole answer after which its engine may take the lease's next request: not a
        server error, not the engine's 429 (at capacity: the retry asks Serve afresh)."""
        return reply.status < 500 and reply.status != 429

    def request(self, call: TierCall) -> Callable[[EngineLease], AsyncIterator[EngineReply]]:
        async def start(lease: EngineLease) -> AsyncIterator[EngineReply]:
            yield await self._pool.post(self._to(lease, call))

        return start

    def stream(self, call: TierCall) -> Callable[[EngineLease], AsyncIterator[Batch]]:
        def start(lease: EngineLease) -> AsyncIterator[Batch]:
            return self._pool.stream(self._to(lease, call))

        return start

    def _to(self, lease: EngineLease, call: TierCall) -> EngineRequest:
        return EngineRequest(
            lease.url, lease.api_key, call.route, call.payload, lease.trace, self._timeout_s
        )
