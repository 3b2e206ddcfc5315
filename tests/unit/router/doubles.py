"""In-process stand-ins for what Serve gives a router replica: tiers as engine clients in this
process (`DirectTransport`) and the quota ledger as a plain object (`InProcessLedger`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: the doubles need none of the router's imports to run
    from serve_app.engine.client import EngineClient, EngineReply
    from serve_app.engine.sse import Batch
    from serve_app.router.dispatch import Calls
    from serve_app.router.quota import Grant, QuotaLedger, Refusal
    from serve_app.tier.call import TierCall


class DirectCalls:
    """An in-process call with Serve's `cancel`: closing it closes the engine request."""

    def __init__(self, items: AsyncIterator[Any]) -> None:
        self._items = items
        self._closing: asyncio.Future[None] | None = None

    def __anext__(self) -> Awaitable[Any]:
        return self._items.__anext__()

    def cancel(self) -> None:
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())

    async def _close(self) -> None:
        with contextlib.suppress(RuntimeError):  # still running: its own cancellation closes it
            await self._items.aclose()  # type: ignore[attr-defined]


class DirectTransport:
    """Tiers as engine clients in this process, without Serve: what a tier replica does, for
    running the router alone (the unit tests)."""

    def __init__(self, clients: Mapping[str, EngineClient]) -> None:
        self._clients = dict(clients)

    def request(self, tier: str, call: TierCall) -> Calls[EngineReply | None]:
        async def items() -> AsyncIterator[EngineReply | None]:
            yield None
            yield await self._clients[tier].post(call.route, call.payload)

        return DirectCalls(items())

    def stream(self, tier: str, call: TierCall) -> Calls[Batch | None]:
        async def items() -> AsyncIterator[Batch | None]:
            yield None
            async for batch in self._clients[tier].stream(call.route, call.payload):
                yield batch

        return DirectCalls(items())

    async def info(self, tier: str) -> dict[str, Any]:
        return await self._clients[tier].info()

    async def report_queue(self, tier: str, router: str, queued: int) -> None:
        """Nothing: without Serve there is no autoscaling to tell."""


class InProcessLedger:
    """A `QuotaLedger` behind the async `LedgerCalls` interface, within one process."""

    def __init__(self, ledger: QuotaLedger) -> None:
        self.ledger = ledger

    async def reserve(
        self,
        key: str,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        tokens: int,
        tokens_per_day: int | None = None,
    ) -> Grant | Refusal:
        return self.ledger.reserve(
            key, requests_per_minute, tokens_per_minute, tokens, tokens_per_day
        )

    async def settle(self, key: str, grant_id: int, tokens_used: int) -> None:
        self.ledger.settle(key, grant_id, tokens_used)
