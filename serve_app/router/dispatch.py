"""Sending a typed call to a tier: waiting (bounded) for a replica to take it, one retry of an
engine at capacity before anything was sent, and cancelling the tier's work when the caller
goes away. The transport is a seam: Serve handles in production, a fake in unit tests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any, Protocol, TypeVar

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle

from ..config import TierConfig
from ..engine.client import EngineClient, EngineReply
from ..engine.pool import EnginePool
from ..engine.sse import Batch
from ..errors import EngineReplyError, EngineUnreachable, TierUnavailable
from ..tier.call import EngineLease, TierCall
from ..tier.replica_choice import route_hint
from ..tier.request_router import session_header
from ..tracing import current
from .direct import EngineCalls, LeasedCalls
from .leases import Lease, LeaseKeeper

# A call that nothing served is tried once more: Serve may pick another replica.
ATTEMPTS = 2
# What a spare lease asks of its replica: the replica reads only the route (its span's name).
SPARE = TierCall("/v1/chat/completions", {}, stream=True, max_tokens=0, prompt_chars=0)
T = TypeVar("T", covariant=True)
R = TypeVar("R")


class Calls(Protocol[T]):
    """A tier call in progress (Serve's `DeploymentResponseGenerator`): first `None` once a
    replica has taken it, then its items; `cancel` stops it in the replica."""

    def __anext__(self) -> Any: ...
    def cancel(self) -> None: ...


class TierTransport(Protocol):
    def request(self, tier: str, call: TierCall) -> Calls[EngineReply | None]: ...
    def stream(self, tier: str, call: TierCall) -> Calls[Batch | None]: ...
    async def info(self, tier: str) -> dict[str, Any]: ...
    async def report_queue(self, tier: str, router: str, queued: int) -> None: ...


class ServeTransport:
    """Tier deployments through their Serve handles. A tier's `data_path` says how answers
    come back: `direct` from the engine a replica leases (`serve_app.router.direct`), `relay`
    through the replica."""

    def __init__(
        self,
        handles: Mapping[str, DeploymentHandle],
        tiers: Mapping[str, TierConfig],
        keep_leases: bool = True,
    ) -> None:
        self._handles = dict(handles)
        self._tiers = dict(tiers)
        self._streams = {name: h.options(stream=True) for name, h in handles.items()}
        pool = EnginePool()
        self._engines = {name: EngineCalls(pool, t.request_timeout_s) for name, t in tiers.items()}
        # Kept leases (`serve_app.router.leases`): direct tiers without their own replica choice
        # (a kept lease skips it), and not while tracing (a trace's tier span is its lease's).
        self._keepers = {
            name: LeaseKeeper(
                t.lease_reuse_s,
                t.lease_idle_s,
                spare_s=t.lease_spare_s,  # 0 for tiers that keep none (`AppConfig.for_router`)
                grant=self._granter(name),
            )
            for name, t in tiers.items()
            if keep_leases and t.keeps_leases
        }

    def request(self, tier: str, call: TierCall) -> Calls[EngineReply | None]:
        if self._tiers[tier].data_path == "direct":
            return self._leased(tier, call, self._engines[tier].request(call), EngineCalls.finished)
        calls: Calls[EngineReply | None] = self._routed(tier, call).request.remote(call)
        return calls

    def stream(self, tier: str, call: TierCall) -> Calls[Batch | None]:
        if self._tiers[tier].data_path == "direct":
            return self._leased(tier, call, self._engines[tier].stream(call))
        calls: Calls[Batch | None] = self._routed(tier, call).stream.remote(call)
        return calls

    def _leased(
        self,
        tier: str,
        call: TierCall,
        start: Callable[[EngineLease], AsyncIterator[R]],
        finished: Callable[[R], bool] | None = None,
    ) -> LeasedCalls[R]:
        keeper = self._keepers.get(tier)
        kept = keeper.take() if keeper is not None else None
        if kept is not None:
            return LeasedCalls(start, tier, kept=kept, keeper=keeper, finished=finished)
        # The replica needs only the route and trace: the prompt stays here, not pickled
        # and shipped to it on every lease.
        grant = self._routed(tier, call).lease.remote(replace(call, payload={}))
        return LeasedCalls(start, tier, call=grant, keeper=keeper, finished=finished)

    def _granter(self, tier: str) -> Callable[[], Awaitable[Lease]]:
        """A fresh lease of `tier` for no request yet: a router's spare (`LeaseKeeper`)."""

        async def grant() -> Lease:
            call = self._streams[tier].lease.remote(SPARE)
            try:
                engine: EngineLease | None = await anext(call, None)
            except BaseException:
                call.cancel()
                raise
            if engine is None:
                call.cancel()
                raise TierUnavailable(f"a replica of tier {tier!r} gave no engine")
            return Lease(call, engine, time.monotonic())

        return grant

    def _routed(self, tier: str, call: TierCall) -> DeploymentHandle:
        """Replica choice (`serve_app.tier.replica_choice`): for a tier with `routing`, the
        request's hint (prefix key or `x-session-id`, sizes) rides in Serve's session id."""
        config = self._tiers[tier]
        if config.routing is None:
            return self._streams[tier]
        hint = route_hint(call.payload, session_header(), config.default_max_tokens, config.routing)
        return self._streams[tier].options(session_id=hint.encode())

    async def info(self, tier: str) -> dict[str, Any]:
        info: dict[str, Any] = await self._handles[tier].info.remote()
        return info

    async def report_queue(self, tier: str, router: str, queued: int) -> None:
        """A router's admission queue length, to one replica of the tier (its autoscaling)."""
        await self._handles[tier].report_admission.remote(router, queued)


class Dispatcher:
    def __init__(self, transport: TierTransport, wait_timeout_s: Callable[[str], float]) -> None:
        self._transport = transport
        self._wait_timeout_s = wait_timeout_s

    async def request(self, tier: str, call: TierCall) -> EngineReply:
        """The engine's whole answer. Cancelling this (the client went away) cancels the tier's
        call, which closes the engine request. A call nothing served (`unserved`) is tried
        once more."""
        call = replace(call, trace=current().carrier())
        for attempt in range(ATTEMPTS):
            last, taken = attempt == ATTEMPTS - 1, False
            replies = self._transport.request(tier, call)
            try:
                await self._taken(tier, replies)
                taken = True
                reply = await anext(replies, None)
            except Exception as exc:
                if last or not unserved(exc, taken):
                    raise
                continue
            finally:
                replies.cancel()
            if reply is None:
                raise TierUnavailable(f"tier {tier!r} ended the call without an answer; retry")
            if reply.status != 429 or last:
                return reply
        raise AssertionError("unreachable")

    async def stream(self, tier: str, call: TierCall) -> tuple[Batch | None, Calls[Batch | None]]:
        """Start a stream and wait for its first batch of chunks, so that an error before any token
        keeps its HTTP status. A call nothing served (`unserved`) is tried once more."""
        call = replace(call, trace=current().carrier())
        for attempt in range(ATTEMPTS):
            last, taken = attempt == ATTEMPTS - 1, False
            chunks = self._transport.stream(tier, call)
            try:
                await self._taken(tier, chunks)
                taken = True
                return await anext(chunks, None), chunks
            except Exception as exc:
                chunks.cancel()
                if last or not unserved(exc, taken):
                    raise
            except BaseException:
                chunks.cancel()
                raise
        raise AssertionError("unreachable")

    async def info(self, tier: str) -> dict[str, Any]:
        return await self._transport.info(tier)

    async def report_queue(self, tier: str, router: str, queued: int) -> None:
        await self._transport.report_queue(tier, router, queued)

    async def _taken(self, tier: str, calls: Calls[Any]) -> None:
        """Wait, within the tier's `replica_wait_timeout_s`, for a replica to take the call."""
        timeout = self._wait_timeout_s(tier)
        try:
            async with asyncio.timeout(timeout):  # passes on a cancellation, always
                await anext(calls)
        except TimeoutError:
            raise TierUnavailable(
                f"no replica of tier {tier!r} took the request within {timeout:.0f}s "
                "(replica_wait_timeout_s): the tier is starting or saturated; retry later"
            ) from None
        current().replica_taken()


def unserved(exc: BaseException, taken: bool) -> bool:
    """A failure before any engine took the call, so that trying again sends it once: an
    engine at capacity (429), one that refused the connection (it exited), or a replica that
    died before it took the call (`taken`: it answered that it had; Serve leaves a dead one
    out of its next choice). A replica lost after taking it may have started the engine
    call, and an error a replica raised (`RayTaskError`) is judged by what it wraps."""
    if isinstance(exc, EngineReplyError):
        return exc.status == 429
    if isinstance(exc, EngineUnreachable):
        return True
    return not taken and isinstance(exc, RayActorError) and not isinstance(exc, RayTaskError)


class _DirectCalls:
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
    running the router alone (unit tests, the ASGI app against a real engine)."""

    def __init__(self, clients: Mapping[str, EngineClient]) -> None:
        self._clients = dict(clients)

    def request(self, tier: str, call: TierCall) -> Calls[EngineReply | None]:
        async def items() -> AsyncIterator[EngineReply | None]:
            yield None
            yield await self._clients[tier].post(call.route, call.payload)

        return _DirectCalls(items())

    def stream(self, tier: str, call: TierCall) -> Calls[Batch | None]:
        async def items() -> AsyncIterator[Batch | None]:
            yield None
            async for batch in self._clients[tier].stream(call.route, call.payload):
                yield batch

        return _DirectCalls(items())

    async def info(self, tier: str) -> dict[str, Any]:
        return await self._clients[tier].info()

    async def report_queue(self, tier: str, router: str, queued: int) -> None:
        """Nothing: without Serve there is no autoscaling to tell."""
