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
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, TypeVar

from ..engine.client import EngineReply
from ..engine.pool import EnginePool, EngineRequest
from ..engine.sse import Batch
from ..errors import TierUnavailable
from ..tier.call import EngineLease, TierCall

T = TypeVar("T")


class LeasedCalls(Generic[T]):
    """A lease call (Serve's response generator of `TierDeployment.lease`) and the engine call
    started on what it yields. `cancel` closes the engine call and gives the lease back."""

    def __init__(
        self, lease: Any, start: Callable[[EngineLease], AsyncIterator[T]], tier: str
    ) -> None:
        self._lease = lease
        self._start = start
        self._tier = tier
        self._items: AsyncIterator[T] | None = None
        self._closing: asyncio.Future[None] | None = None

    def __anext__(self) -> Awaitable[T | None]:
        return self._next()

    async def _next(self) -> T | None:
        if self._items is not None:
            return await anext(self._items)
        lease: EngineLease | None = await anext(self._lease, None)
        if lease is None:
            raise TierUnavailable(f"a replica of tier {self._tier!r} gave no engine; retry")
        self._items = self._start(lease)
        return None

    def cancel(self) -> None:
        self._lease.cancel()
        if self._items is not None and self._closing is None:
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
