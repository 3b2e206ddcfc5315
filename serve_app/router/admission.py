"""The router's admission queues (one per tier with `admission` set), how a request's
priority is read (the key's class, lowered, never raised, by an `x-priority` header), and the
queues' lengths reported to their tiers for autoscaling."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import get_args

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..config import AppConfig
from ..errors import InvalidRequest
from ..metrics import app_metrics
from .auth import Tenant
from .fair_queue import PRIORITIES, Admission, Priority, Ticket

ANONYMOUS = "anonymous"  # the one tenant when API keys are off
WAIT_HEADER = b"x-admission-wait-ms"  # how long the request waited for its turn
Handler = Callable[[Request], Awaitable[Response]]


def admissions(config: AppConfig) -> dict[str, Admission]:
    return {
        tier.name: Admission(
            tier.name,
            max_in_flight=tier.admission.max_in_flight,
            max_queued=tier.admission.max_queued,
            max_wait_s=tier.admission.max_wait_s,
            reserved_turns=tier.admission.reserve,
            idle_after_s=tier.admission.idle_after_s,
            on_change=_export,
        )
        for tier in config.tiers
        if tier.admission is not None
    }


def _export(tier: str, priority: Priority, length: int) -> None:
    app_metrics().admission_queue.set(length, {"tier": tier, "priority": priority})


REPORT_PERIOD_S = 1.0


async def report_queues(
    admissions: Mapping[str, Admission],
    send: Callable[[str, int], Awaitable[None]],
    period_s: float = REPORT_PERIOD_S,
) -> None:
    """Forever: every `period_s`, each tier's queue length to `send(tier, queued)` (to the
    tier, for its autoscaling: `serve_app.autoscaling`), while anyone waits and once more when
    the queue empties. A report that fails or is not taken within the period is dropped: the
    next one replaces it."""
    last = dict.fromkeys(admissions, 0)
    while True:
        for tier, admission in admissions.items():
            queued = admission.queued
            if queued or last[tier]:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(send(tier, queued), period_s)
            last[tier] = queued
        await asyncio.sleep(period_s)


def priority(tenant: Tenant | None, header: str | None) -> Priority:
    """The key's class, or a lower one asked for with `x-priority`."""
    allowed: Priority = tenant.priority if tenant is not None else PRIORITIES[0]
    if header is None:
        return allowed
    asked = header.strip().lower()
    if asked not in get_args(Priority):
        raise InvalidRequest(
            f"x-priority must be one of {', '.join(PRIORITIES)}, not {header!r}",
            param="x-priority",
        )
    return max(allowed, asked, key=PRIORITIES.index)  # type: ignore[arg-type]


class Admitted:
    """The request's turn, if its tier queues: left once, whichever way the request ends."""

    def __init__(self) -> None:
        self._held: tuple[Admission, Ticket] | None = None

    async def enter(self, admission: Admission, request: Request, cost: float) -> None:
        tenant: Tenant | None = request.state.tenant
        name = tenant.name if tenant is not None else ANONYMOUS
        weight = tenant.weight if tenant is not None else 1.0
        asked = priority(tenant, request.headers.get("x-priority"))
        self._held = (admission, await admission.enter(name, asked, cost, weight))

    def leave(self, tokens: float | None = None) -> None:
        if self._held is not None:
            admission, ticket = self._held
            admission.leave(ticket, tokens)

    def wrap(self, response: Response) -> Response:
        """The answer, holding the turn until sent; it tells how long the request waited."""
        if self._held is None:
            return response
        waited_ms = round(self._held[1].waited_s * 1000)
        response.raw_headers.append((WAIT_HEADER, str(waited_ms).encode()))
        return LeavingResponse(response, self)


class LeavingResponse(Response):
    """Leaves the queue's turn once the answer is sent, streamed or not, client there or not."""

    def __init__(self, inner: Response, admitted: Admitted) -> None:
        self._inner = inner
        self._admitted = admitted
        self.status_code = inner.status_code
        self.raw_headers = inner.raw_headers
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._inner(scope, receive, send)
        finally:
            self._admitted.leave()


def leaving(route: Handler) -> Handler:
    """A route whose request leaves its tier's queue once answered, however it ends: the
    answer carries the turn until it is sent; a cancelled request gives it back at once."""

    async def admitted_route(request: Request) -> Response:
        admitted = request.state.admitted = Admitted()
        try:
            response = await route(request)
        except BaseException:
            admitted.leave()
            raise
        return admitted.wrap(response)

    return admitted_route
