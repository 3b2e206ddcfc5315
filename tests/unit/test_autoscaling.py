"""The queue-length policy as a pure function, driven through load shapes."""

from __future__ import annotations

from types import SimpleNamespace
from typing import NamedTuple

from serve_app.autoscaling import (
    ADMISSION_QUEUE,
    ADMISSION_REPORT_TTL_S,
    ENGINE_QUEUE,
    ENGINE_RUNNING,
    SCALING_RULE,
    QueueLengthPolicy,
    admission_stats,
    decide,
    fresh_reports,
    queued_in_routers,
    rule_from_stats,
    rule_stats,
)
from serve_app.config import QueueScaling, ScalingTuning

RULE = QueueScaling(
    target_per_replica=4, upscale_delay_s=3, downscale_delay_s=30,
    tuning=ScalingTuning(max_step_up=2, max_step_down=1, hysteresis=0.2),
)  # fmt: skip


def run(demands: list[float], *, start: int = 1, lo: int = 1, hi: int = 8,
        rule: QueueScaling = RULE) -> list[int]:  # fmt: skip
    """Feed one demand sample per second; returns the replica count after each."""
    current, pending, counts = start, None, []
    for second, demand in enumerate(demands):
        d = decide(demand=demand, current=current, min_replicas=lo, max_replicas=hi,
                   now=float(second), pending=pending, rule=rule)  # fmt: skip
        current, pending = d.replicas, d.pending
        counts.append(current)
    return counts


def test_step_load_scales_up_after_the_delay_in_bounded_steps() -> None:
    counts = run([20.0] * 10)
    assert counts[:3] == [1, 1, 1]  # waiting out the 3 s delay
    assert counts[3] == 3  # one step: at most +2
    assert counts[-1] == 5  # ceil(20 / 4)


def test_a_spike_shorter_than_the_delay_changes_nothing() -> None:
    assert run([1, 1, 30, 30, 1, 1, 1, 1]) == [1] * 8


def test_slow_decay_scales_down_one_at_a_time_after_the_delay() -> None:
    counts = run([0.0] * 100, start=4)
    assert counts[29] == 4 and counts[30] == 3  # 30 s of low demand before the first step
    assert counts[61] == 2 and counts[92] == 1
    assert min(counts) == 1  # never below min_replicas


def test_a_scale_down_that_waited_does_not_let_a_burst_scale_up_at_once() -> None:
    # 2 replicas, no demand for 31 s (a scale-down waiting out its 30 s), then one second of
    # demand 30: the way up waits its own 3 s, so the one-second burst changes nothing.
    counts = run([0.0] * 29 + [30.0, 0.0, 0.0], start=2)
    assert set(counts) == {2}
    # the way up after a wish to go down: 3 s of demand from when it turned
    counts = run([0.0] * 20 + [30.0] * 5, start=2)
    assert counts[20:] == [2, 2, 2, 4, 4]


def test_demand_at_a_boundary_does_not_flap() -> None:
    # 2 replicas carry 8; demand alternating 7 and 9 must not walk the count up and down.
    counts = run([9.0, 7.0] * 40, start=2)
    assert set(counts) == {2}


def test_hysteresis_holds_a_replica_until_demand_clearly_fits_fewer() -> None:
    # 3 replicas, demand 7.5: 2 replicas could carry 8, but not with a 20 % margin (6.4).
    assert set(run([7.5] * 60, start=3)) == {3}


def test_zero_and_max_bounds() -> None:
    assert run([0.0, 0.0, 3.0], start=0, lo=0) == [0, 0, 1]  # cold start at once
    assert run([0.0] * 40, start=1, lo=0)[-1] == 0  # scale to zero after the delay
    assert run([1000.0] * 20, hi=4)[-1] == 4


class Sample(NamedTuple):
    """One point of a Serve time series (`TimeStampedValue`): what the policy reads."""

    timestamp: float
    value: float


def test_the_routers_admission_queues_add_to_demand_once_per_router() -> None:
    raw = {
        ENGINE_QUEUE: {"r1": [Sample(0, 2)], "r2": [Sample(0, 1)]},
        ENGINE_RUNNING: {"r1": [Sample(0, 4)], "r2": [Sample(0, 4)]},
        # router A's last report reached r1 and an older one r2: it counts once, the latest max
        f"{ADMISSION_QUEUE}:A": {"r1": [Sample(0, 3), Sample(1, 9)], "r2": [Sample(0, 5)]},
        f"{ADMISSION_QUEUE}:B": {"r2": [Sample(1, 6)]},
        f"{ADMISSION_QUEUE}:C": {"r1": []},  # nothing left in the look-back window
    }
    assert queued_in_routers(raw) == 9 + 6
    ctx = SimpleNamespace(raw_metrics=raw, total_queued_requests=2)
    assert QueueLengthPolicy(**RULE.model_dump()).demand(ctx) == 2 + 1 + 4 + 4 + 15 + 2  # type: ignore[arg-type]


def test_a_replica_passes_on_only_fresh_reports() -> None:
    reports = {"A": (4.0, 100.0), "B": (7.0, 100.0 - ADMISSION_REPORT_TTL_S - 0.1)}
    fresh = fresh_reports(reports, now=100.5)
    assert fresh == {"A": (4.0, 100.0)}
    assert admission_stats(fresh) == {f"{ADMISSION_QUEUE}:A": 4.0}
    assert fresh_reports(fresh, now=100.0 + ADMISSION_REPORT_TTL_S + 1) == {}


def test_the_rule_the_replicas_report_is_the_rule_the_policy_applies() -> None:
    """A tier of its own application: its rule reaches the policy through its replicas'
    reports, so that a change of it is live (the policy's own arguments would restart them)."""
    stats = rule_stats(RULE)
    raw = {name: {"r1": [Sample(0, value)]} for name, value in stats.items()}
    assert rule_from_stats(raw, QueueScaling()) == RULE
    # while a change reaches the replicas, the larger value of each field holds
    raw[f"{SCALING_RULE}:target_per_replica"]["r2"] = [Sample(1, 6)]
    assert rule_from_stats(raw, QueueScaling()).target_per_replica == 6
    # no replica, no report: the policy's own
    assert rule_from_stats({ENGINE_QUEUE: {}}, RULE) == RULE
    broken = {f"{SCALING_RULE}:tuning.hysteresis": {"r1": [Sample(0, 5)]}}
    assert rule_from_stats(broken, RULE) == RULE  # an invalid report is not applied


def test_the_policy_scales_on_the_reported_rule() -> None:
    slow = RULE.model_copy(update={"target_per_replica": 1.0, "upscale_delay_s": 0.0})
    raw = {ENGINE_QUEUE: {"r1": [Sample(0, 3)]}, ENGINE_RUNNING: {"r1": [Sample(0, 0)]}}
    raw.update({name: {"r1": [Sample(0, v)]} for name, v in rule_stats(slow).items()})
    ctx = SimpleNamespace(
        raw_metrics=raw, total_queued_requests=0, total_num_requests=3, policy_state={},
        current_num_replicas=1, target_num_replicas=1, capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8, current_time=10.0, deployment_name="tier-small",
    )  # fmt: skip
    replicas, _ = QueueLengthPolicy(**RULE.model_dump())(ctx)  # type: ignore[arg-type]
    assert replicas == 3  # 3 requests at 1 per replica, without the policy's own 3 s delay
