"""Sending a typed call to a tier: waiting (bounded) for a replica to take it, one retry of an
engine at capacity before anything was sent, and cancelling the tier's work when the caller
goes away. The transport is a seam: Serve handles in production, a fake in unit tests.

`ray_errors` is the one place where Ray's and Serve's exceptions from a tier call become the
project's (`ReplicaUnavailable`, `TierOverloaded`, `TierUnavailable`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Generic, Protocol, TypeVar

from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from ..config import TierConfig
from ..engine.client import EngineClient, EngineConnections, EngineReply
from ..engine.sse import Batch
from ..engine.tgi_over_openai import TgiStream
from ..errors import (
    EngineReplyError,
    EngineUnreachable,
    ReplicaUnavailable,
    ServeAppError,
    TierOverloaded,
    TierUnavailable,
)
from ..tier.call import TierCall
from ..tier.replica_choice import route_hint
from ..tier.request_router import session_header
from ..tracing import RequestTrace
from .leases import EngineLease, GrantCall, Keeping, TierLeases, reusable_after
from .tier_states import TierBoard, TierStatus, describe, retry_after_s

# A call that nothing served is tried once more: Serve may pick another replica.
ATTEMPTS = 2
# A version added while a request's services were built has no bound in them yet: the default.
DEFAULT_WAIT_S: float = TierConfig.model_fields["replica_wait_timeout_s"].default
T = TypeVar("T", covariant=True)


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
    come back: `direct` from the engine a replica leases (`serve_app.router.leases`), `relay`
    through the replica."""

    def __init__(
        self,
        handles: Mapping[str, DeploymentHandle],
        tiers: Mapping[str, TierConfig],
        keep_leases: bool = True,
    ) -> None:
        self._engines = EngineConnections()  # the direct data path's, to every engine
        self._keep_leases = keep_leases
        self._handles: dict[str, DeploymentHandle] = {}
        self._tiers: dict[str, TierConfig] = {}
        self._streams: dict[str, DeploymentHandle] = {}
        self._leases: dict[str, TierLeases] = {}
        self.update(handles, tiers)

    def update(
        self, handles: Mapping[str, DeploymentHandle], tiers: Mapping[str, TierConfig]
    ) -> None:
        """The tiers as they are now configured (a router's live reconfiguration): a tier whose
        lease keeping changed, or that is gone, has its kept leases given back."""
        keeping = {name: self._keeping(t) for name, t in tiers.items()}
        for name, leases in list(self._leases.items()):
            if (
                name not in tiers
                or keeping[name] != self._keeping(self._tiers[name])
                or handles[name] is not self._handles.get(name)  # another version now
            ):
                leases.close()
                del self._leases[name]
        # Kept leases: direct tiers without their own replica choice (a kept lease skips it),
        # and not while tracing (a trace's tier span is its lease's).
        for name in tiers:
            if name not in self._leases:
                self._leases[name] = TierLeases(name, self._asker(name), keeping[name])
        self._streams = {
            name: self._streams[name] if self._handles.get(name) is h else h.options(stream=True)
            for name, h in handles.items()
        }
        self._handles = dict(handles)
        self._tiers = dict(tiers)

    def _keeping(self, tier: TierConfig) -> Keeping | None:
        return _keeping(tier) if self._keep_leases else None

    def request(self, tier: str, call: TierCall) -> Calls[EngineReply | None]:
        if self._config(tier).tuning.data_path == "direct":
            return self._leases[tier].calls(call, self._post(tier, call), reusable_after)
        return RayCalls(tier, self._routed(tier, call).request.remote(call))

    def stream(self, tier: str, call: TierCall) -> Calls[Batch | None]:
        if self._config(tier).tuning.data_path == "direct":
            return self._leases[tier].calls(call, self._stream(tier, call))
        return RayCalls(tier, self._routed(tier, call).stream.remote(call))

    def _config(self, tier: str) -> TierConfig:
        """The tier's (or version's) settings; one the configuration no longer has (a candidate
        promoted or removed while a request that chose it waited) cannot take requests."""
        config = self._tiers.get(tier)
        if config is None:
            raise TierUnavailable(f"tier {tier!r} is no longer configured", retry_after_s=1)
        return config

    def _asker(self, tier: str) -> Callable[[TierCall], GrantCall]:
        """Serve's call to `TierDeployment.lease`, for a request or (`SPARE`) for none."""

        def ask(call: TierCall) -> GrantCall:
            # The replica needs only the route and trace: the prompt stays here, not pickled
            # and shipped to it on every lease.
            return RayCalls(tier, self._routed(tier, call).lease.remote(replace(call, payload={})))

        return ask

    def _post(
        self, tier: str, call: TierCall
    ) -> Callable[[EngineLease], AsyncIterator[EngineReply]]:
        async def start(lease: EngineLease) -> AsyncIterator[EngineReply]:
            yield await self._engine(tier, lease).post(call.route, call.payload, lease.trace)

        return start

    def _stream(self, tier: str, call: TierCall) -> Callable[[EngineLease], AsyncIterator[Batch]]:
        def start(lease: EngineLease) -> AsyncIterator[Batch]:
            return self._engine(tier, lease).stream(call.route, call.payload, lease.trace)

        return start

    def _engine(self, tier: str, lease: EngineLease) -> EngineClient:
        """The leased engine, over this router's connections, with the tier's time bound."""
        timeout_s = self._tiers[tier].request_timeout_s
        return EngineClient(lease.url, timeout_s, api_key=lease.api_key, connections=self._engines)

    def _routed(self, tier: str, call: TierCall) -> DeploymentHandle:
        """Replica choice (`serve_app.tier.replica_choice`): for a tier with `routing`, the
        request's hint (prefix key or `x-session-id`, sizes) rides in Serve's session id."""
        config = self._tiers[tier]
        if config.routing is None:
            return self._streams[tier]
        # The session id is read from Serve's own request context, where its proxy put the
        # `x-session-id` header (under the name `RAY_SERVE_SESSION_ID_HEADER_KEY` gives it).
        hint = route_hint(call.payload, session_header(), config.default_max_tokens, config.routing)
        return self._streams[tier].options(session_id=hint.encode())

    async def info(self, tier: str) -> dict[str, Any]:
        with ray_errors(tier):
            info: dict[str, Any] = await self._handles[tier].info.remote()
        return info

    async def report_queue(self, tier: str, router: str, queued: int) -> None:
        """A router's admission queue length, to one replica of the tier (its autoscaling)."""
        with ray_errors(tier):
            await self._handles[tier].report_admission.remote(router, queued)


def _keeping(tier: TierConfig) -> Keeping | None:
    tuning = tier.tuning
    if not tier.keeps_leases:
        return None
    # `lease_spare_s` is 0 for tiers that keep none (`AppConfig.for_router`).
    return Keeping(tuning.lease_reuse_s, tuning.lease_idle_s, tuning.lease_spare_s)


@contextmanager
def ray_errors(tier: str) -> Iterator[None]:
    """Ray's and Serve's exceptions from a call to `tier` as the project's: the one place where
    they are translated. A project error a replica raised comes wrapped in Ray's `RayTaskError`,
    which subclasses it: it passes as it is."""
    try:
        yield
    except ServeAppError:
        raise
    except (RayActorError, ActorUnavailableError) as exc:
        raise ReplicaUnavailable(
            f"the replica of tier {tier!r} serving this request died; retry"
        ) from exc
    except BackPressureError as exc:
        raise TierOverloaded(f"the queue of tier {tier!r} is full; retry shortly") from exc
    except DeploymentUnavailableError as exc:
        raise TierUnavailable(f"tier {tier!r} has no running replica", retry_after_s=5) from exc


class RayCalls(Generic[T]):
    """A Serve call in progress (`DeploymentResponseGenerator`), its failures translated."""

    __slots__ = ("_calls", "_tier")

    def __init__(self, tier: str, calls: Any) -> None:
        self._tier = tier
        self._calls = calls

    async def __anext__(self) -> T:
        with ray_errors(self._tier):
            item: T = await self._calls.__anext__()
        return item

    def cancel(self) -> None:
        self._calls.cancel()


class Dispatcher:
    def __init__(
        self,
        transport: TierTransport,
        wait_timeout_s: Mapping[str, float],
        states: TierBoard | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`wait_timeout_s`: each tier's `replica_wait_timeout_s`; `states`: the tiers' states
        as the router's background watch last saw them (`serve_app.router.tier_states`)."""
        self._transport = transport
        self._wait_timeout_s = wait_timeout_s
        self._states = states if states is not None else TierBoard()
        self._clock = clock

    async def request(self, tier: str, call: TierCall, trace: RequestTrace) -> EngineReply:
        """The engine's whole answer (TGI's, for a call translated to an OpenAI-only engine:
        `call.answer`). Cancelling this (the client went away) cancels the tier's call, which
        closes the engine request."""
        reply = await self._request(tier, call, trace)
        return reply if call.answer is None else call.answer.reply(reply)

    async def stream(
        self, tier: str, call: TierCall, trace: RequestTrace
    ) -> tuple[Batch | None, Calls[Batch | None]]:
        """Start a stream and wait for its first batch of chunks, so that an error before any
        token keeps its HTTP status; for a translated call (`call.answer`), TGI's events."""
        if call.answer is None:
            return await self._stream(tier, call, trace)
        try:
            first, chunks = await self._stream(tier, call, trace)
        except EngineReplyError as exc:
            raise call.answer.error(exc) from exc
        events = TgiStream(call.answer.events(), chunks)
        try:
            return await events.first(first), events
        except BaseException:
            events.cancel()
            raise

    async def _request(self, tier: str, call: TierCall, trace: RequestTrace) -> EngineReply:
        """A call nothing served (`unserved`) is tried once more."""
        call = replace(call, trace=trace.carrier())
        for attempt in range(ATTEMPTS):
            last, taken = attempt == ATTEMPTS - 1, False
            replies = self._transport.request(tier, call)
            try:
                await self._taken(tier, replies, trace)
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

    async def _stream(
        self, tier: str, call: TierCall, trace: RequestTrace
    ) -> tuple[Batch | None, Calls[Batch | None]]:
        """A call nothing served (`unserved`) is tried once more."""
        call = replace(call, trace=trace.carrier())
        for attempt in range(ATTEMPTS):
            last, taken = attempt == ATTEMPTS - 1, False
            chunks = self._transport.stream(tier, call)
            try:
                await self._taken(tier, chunks, trace)
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

    async def _taken(self, tier: str, calls: Calls[Any], trace: RequestTrace) -> None:
        """Wait, within the tier's `replica_wait_timeout_s`, for a replica to take the call. A
        tier known to have failed (Serve gave up starting it) is refused at once, and so is a
        wait under way when it fails; a tier still starting is waited for, and the refusal at
        the end of the wait says how far it got."""
        failed = self._states.failed(tier)
        if failed is not None:
            raise self._refusal(failed)
        timeout = self._wait_timeout_s.get(tier, DEFAULT_WAIT_S)
        status = self._states.get(tier)
        try:
            async with asyncio.timeout(timeout):  # passes on a cancellation, always
                if status is None or status.ready:  # the common case: no watch for failure
                    await anext(calls)
                else:
                    await self._unless_failed(tier, calls)
        except TimeoutError:
            status = self._states.get(tier)
            waited = (
                f"no replica of tier {tier!r} took the request within {timeout:.0f}s "
                "(replica_wait_timeout_s)"
            )
            if status is None or status.ready:
                raise ReplicaWaitTimeout(
                    f"{waited}: the tier is starting or saturated; retry later"
                ) from None
            raise ReplicaWaitTimeout(
                f"{describe(status, self._clock())}; {waited}; retry later",
                retry_after_s=retry_after_s(status),
            ) from None
        trace.replica_taken()

    async def _unless_failed(self, tier: str, calls: Calls[Any]) -> None:
        """The first item of `calls`, unless the tier is found to have failed first."""
        taken = asyncio.ensure_future(anext(calls))
        failing = asyncio.ensure_future(self._states.until_failed(tier))
        try:
            await asyncio.wait((taken, failing), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (taken, failing):
                if not task.done():
                    task.cancel()
        if taken.done() and not taken.cancelled():
            taken.result()
            return
        raise self._refusal(failing.result())

    def _refusal(self, status: TierStatus) -> TierUnavailable:
        return TierUnavailable(
            f"{describe(status, self._clock())}; retry later",
            retry_after_s=retry_after_s(status),
        )


class ReplicaWaitTimeout(TierUnavailable):
    """No replica took the call within the tier's `replica_wait_timeout_s`."""


def moved(exc: BaseException) -> bool:
    """A version that cannot take requests now (no replica, its application being deleted by a
    promote, its engine gone), as opposed to one that answered or was too slow: the request may
    go to the tier's other version (`serve_app.router.versions`)."""
    if isinstance(exc, ReplicaWaitTimeout):
        return False
    return isinstance(exc, (TierUnavailable, ReplicaUnavailable, EngineUnreachable))


def unserved(exc: BaseException, taken: bool) -> bool:
    """A failure before any engine took the call, so that trying again sends it once: an
    engine at capacity (429), one that refused the connection (it exited), or a replica that
    died before it took the call (`taken`: it answered that it had; Serve leaves a dead one
    out of its next choice). A replica lost after taking it may have started the engine
    call. An error a replica raised (Ray's `RayTaskError`) is judged by what it wraps."""
    if isinstance(exc, EngineReplyError):
        return exc.status == 429
    if isinstance(exc, EngineUnreachable):
        return True
    return not taken and isinstance(exc, ReplicaUnavailable)
