"""The router's admission queues (one per tier with `admission` set), how a request's
priority is read (the key's class, lowered, never raised, by an `x-priority` header), and the
queues' lengths reported to their tiers for autoscaling."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import get_args

from ..config import AppConfig
from ..errors import InvalidRequest
from ..metrics import app_metrics
from .auth import Tenant
from .fair_queue import PRIORITIES, Admission, Priority

ANONYMOUS = "anonymous"  # the one tenant when API keys are off


def admissions(config: AppConfig) -> dict[str, Admission]:
    return {
        tier.name: Admission(
            tier.name,
            max_in_flight=tier.admission.max_in_flight,
            max_queued=tier.admission.tuning.max_queued,
            max_wait_s=tier.admission.max_wait_s,
            reserved_turns=tier.admission.reserve,
            idle_after_s=tier.admission.tuning.idle_after_s,
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
