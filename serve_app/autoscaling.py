"""Where autoscaling decides: tiers scale on the engine's real queue.

Every tier replica reports its engine's waiting queue and running batch (`tgi_queue_size`,
`tgi_batch_current_size`, scraped from the engine's `/metrics`). The policy adds the requests that
wait in Serve for a replica and those that wait in the routers' admission queues (tiers with
`admission`: each router replica reports its queue's length to one replica of the tier every
second, which passes it on under the name `admission_queue:<router>` while it is fresh; the
largest recent value per router counts, so a report seen by two replicas counts once), and
sizes the tier so that each replica carries about `target_per_replica` of that demand:

    desired = ceil(demand / target_per_replica), within [min_replicas, max_replicas]

A change waits for its delay (`upscale_delay_s`, `downscale_delay_s`) to hold without a break,
moves at most `tuning.max_step_up` / `tuning.max_step_down` replicas at once, and scale-down
only happens once demand is below what one replica fewer could carry by the `tuning.hysteresis`
margin, so a demand hovering at a boundary does not flap. From zero replicas any demand starts
one at once.

`decide` is a pure function; `QueueLengthPolicy` is its Serve wiring, run by the Serve
controller with an `AutoscalingContext`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from ray.serve.config import AutoscalingContext

from .config import QueueScaling

logger = logging.getLogger("ray.serve")

# Names under which tier replicas report their load (`TierDeployment.record_autoscaling_stats`).
ENGINE_QUEUE = "engine_queue"
ENGINE_RUNNING = "engine_running"
ADMISSION_QUEUE = "admission_queue"  # + ":<router replica id>"
SCALING_RULE = "scaling_rule"  # + ":<field of QueueScaling, dotted>"
ADMISSION_REPORT_TTL_S = 3.0  # a router's report counts this long after it arrived


def fresh_reports(
    reports: dict[str, tuple[float, float]], now: float
) -> dict[str, tuple[float, float]]:
    """A tier replica's reports from routers, router -> (queued, when reported), without the
    stale ones (a router that stopped reporting, or now reports to another replica)."""
    return {r: report for r, report in reports.items() if now - report[1] <= ADMISSION_REPORT_TTL_S}


def admission_stats(reports: dict[str, tuple[float, float]]) -> dict[str, float]:
    """The reports as the custom metrics a tier replica records."""
    return {f"{ADMISSION_QUEUE}:{router}": queued for router, (queued, _) in reports.items()}


Pending = tuple[str, float]  # ("up" or "down", when that wish to change began)


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str
    pending: Pending | None  # the wish to change that waits for its delay, if one does


def decide(
    *,
    demand: float,
    current: int,
    min_replicas: int,
    max_replicas: int,
    now: float,
    pending: Pending | None,
    rule: QueueScaling,
) -> Decision:
    """The replica count for `demand`, given the count now and how long a change has waited.
    A wish waits afresh when it turns: a scale-down that waited does not count for an up."""

    def since(direction: str) -> float:
        return pending[1] if pending is not None and pending[0] == direction else now

    desired = max(min_replicas, min(max_replicas, math.ceil(demand / rule.target_per_replica)))
    if current == 0 and demand > 0:
        return Decision(max(1, desired), f"demand {demand:g} at zero replicas: cold start", None)
    if desired > current:
        started = since("up")
        if now - started < rule.upscale_delay_s:
            return Decision(current, f"up to {desired} waits for upscale delay", ("up", started))
        target = min(desired, current + rule.tuning.max_step_up)
        return Decision(
            target,
            f"demand {demand:g} over {current} x {rule.target_per_replica:g} for "
            f"{now - started:.1f}s",
            None,
        )
    # One replica fewer must carry the demand with room to spare before it is given up.
    room = (current - 1) * rule.target_per_replica * (1 - rule.tuning.hysteresis)
    if desired < current and demand <= room:
        started = since("down")
        if now - started < rule.downscale_delay_s:
            return Decision(
                current, f"down to {desired} waits for downscale delay", ("down", started)
            )
        target = max(desired, current - rule.tuning.max_step_down)
        return Decision(
            target, f"demand {demand:g} fits {target} replicas for {now - started:.1f}s", None
        )
    return Decision(current, "demand within bounds", None)


def _latest(series: Any) -> float:
    return float(series[-1].value) if series else 0.0


def queued_in_routers(raw: dict[str, Any]) -> float:
    """Requests waiting in the routers' admission queues: per router, the largest latest
    report among the tier's replicas; summed over routers."""
    return sum(
        max((_latest(series) for series in by_replica.values()), default=0.0)
        for name, by_replica in raw.items()
        if name.startswith(ADMISSION_QUEUE + ":")
    )


def rule_stats(rule: QueueScaling) -> dict[str, float]:
    """A tier's scaling rule as the custom metrics its replicas record, `scaling_rule:<field>`:
    how the rule of a tier that is its own application reaches the policy, live."""
    flat = {key: value for key, value in rule.model_dump().items() if key != "tuning"}
    flat.update({f"tuning.{key}": value for key, value in rule.tuning.model_dump().items()})
    return {f"{SCALING_RULE}:{key}": float(value) for key, value in flat.items()}


def rule_from_stats(raw: dict[str, Any], fallback: QueueScaling) -> QueueScaling:
    """The rule the replicas last reported (the largest value where they differ, while a
    change reaches them), else `fallback`: at zero replicas, or replicas that report none."""
    values: dict[str, float] = {}
    for name, by_replica in raw.items():
        if name.startswith(SCALING_RULE + ":"):
            latest = [_latest(series) for series in by_replica.values() if series]
            if latest:
                values[name.split(":", 1)[1]] = max(latest)
    if not values:
        return fallback
    data = fallback.model_dump()
    for key, value in values.items():
        section, _, field = key.rpartition(".")
        target = data[section] if section else data
        if field in target:
            target[field] = int(value) if field.startswith("max_step") else value
    try:
        return QueueScaling.model_validate(data)
    except ValueError:
        return fallback


class QueueLengthPolicy:
    """Serve's custom autoscaling policy for a tier. Its rule (`QueueScaling`) comes from the
    replicas' reports when they make one (`rule_stats`), else from `policy_kwargs`."""

    def __init__(self, **kwargs: Any) -> None:
        self.rule = QueueScaling(**kwargs)

    def demand(self, ctx: AutoscalingContext) -> float:
        """Requests queued or running in the engines, plus those waiting in Serve and in the
        routers' admission queues."""
        raw = ctx.raw_metrics or {}
        engines = sum(
            _latest(series)
            for name in (ENGINE_QUEUE, ENGINE_RUNNING)
            for series in raw.get(name, {}).values()
        )
        return engines + float(ctx.total_queued_requests or 0) + queued_in_routers(raw)

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        state = dict(ctx.policy_state or {})
        demand = self.demand(ctx)
        if ctx.current_num_replicas == 0 and ctx.total_num_requests > 0:
            demand = max(demand, float(ctx.total_num_requests))
        decision = decide(
            demand=demand,
            # the count Serve is already moving to, so a scale-up under way is not undone
            current=ctx.target_num_replicas,
            min_replicas=ctx.capacity_adjusted_min_replicas,
            max_replicas=ctx.capacity_adjusted_max_replicas,
            now=float(ctx.current_time or 0.0),
            pending=_pending(state.get("pending")),
            rule=rule_from_stats(ctx.raw_metrics or {}, self.rule),
        )
        if decision.replicas != ctx.target_num_replicas:
            logger.info(
                "autoscaling %s: %d -> %d replicas (%s)",
                ctx.deployment_name, ctx.target_num_replicas, decision.replicas, decision.reason,
            )  # fmt: skip
        state["pending"] = list(decision.pending) if decision.pending is not None else None
        return decision.replicas, state


def _pending(stored: Any) -> Pending | None:
    """The policy state's pending wish (kept as a list), or None."""
    if isinstance(stored, (list, tuple)) and len(stored) == 2 and stored[0] in ("up", "down"):
        return str(stored[0]), float(stored[1])
    return None
