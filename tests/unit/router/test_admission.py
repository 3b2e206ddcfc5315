"""A request's priority (the key's class, lowered by a header) and the keys' new fields."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from serve_app.config import ApiKeysConfig, AppConfig
from serve_app.errors import InvalidRequest
from serve_app.router.admission import admissions, priority, report_queues
from serve_app.router.auth import Tenant, load_tenants
from serve_app.router.fair_queue import Admission


def tenant(level: str) -> Tenant:
    return Tenant("t", b"", None, None, None, priority=level)  # type: ignore[arg-type]


def test_the_key_sets_the_class_and_a_header_may_only_lower_it() -> None:
    assert priority(tenant("interactive"), None) == "interactive"
    assert priority(tenant("interactive"), "batch") == "batch"
    assert priority(tenant("batch"), "interactive") == "batch"  # not raised
    assert priority(tenant("batch"), None) == "batch"
    assert priority(None, " Batch ") == "batch"  # no keys: the header decides
    assert priority(None, None) == "interactive"


def test_an_unknown_priority_header_is_a_400_naming_it() -> None:
    with pytest.raises(InvalidRequest, match="x-priority must be one of interactive, batch"):
        priority(None, "urgent")


def test_keys_carry_priority_and_weight() -> None:
    text = (
        "- {name: a, key: aaaaaaaaaaaaaaaaaaaa, priority: batch, weight: 3}\n"
        "- {name: b, key: bbbbbbbbbbbbbbbbbbbb}\n"
    )
    a, b = load_tenants(ApiKeysConfig(env="K"), {"K": text})
    assert (a.priority, a.weight, b.priority, b.weight) == ("batch", 3.0, "interactive", 1.0)
    with pytest.raises(ValueError, match="priority"):
        load_tenants(
            ApiKeysConfig(env="K"), {"K": "- {name: c, key: cccccccccccccccccc, priority: vip}"}
        )


def test_only_tiers_with_admission_get_a_queue() -> None:
    config = AppConfig.model_validate(
        {
            "tiers": [
                {"name": "a", "admission": {"max_in_flight": 4, "max_wait_s": 2}},
                {"name": "b"},
            ]
        }
    )
    queues = admissions(config)
    assert list(queues) == ["a"]
    with pytest.raises(ValueError, match="max_in_flight"):
        AppConfig.model_validate({"tiers": [{"name": "a", "admission": {"max_in_flight": 0}}]})


@pytest.mark.parametrize(
    ("given", "reserve"),
    [
        ({"max_in_flight": 64}, 8),
        ({"max_in_flight": 4}, 1),
        ({"max_in_flight": 8, "tuning": {"reserved_turns": 0}}, 0),
    ],
)
def test_the_reserve_defaults_to_an_eighth_of_the_turns(
    given: dict[str, Any], reserve: int
) -> None:
    config = AppConfig.model_validate({"tiers": [{"name": "a", "admission": given}]})
    assert admissions(config)["a"].scheduler.turns.reserved == reserve


def test_a_reserve_larger_than_the_turns_is_refused_naming_both() -> None:
    admission = {"max_in_flight": 4, "tuning": {"reserved_turns": 5}}
    with pytest.raises(
        ValueError, match=r"reserved_turns \(5\) must not exceed max_in_flight \(4\)"
    ):
        AppConfig.model_validate({"tiers": [{"name": "a", "admission": admission}]})


def test_queue_lengths_are_reported_while_anyone_waits_and_once_when_empty() -> None:
    """The real admission queue, one turn: two requests wait behind it, then leave."""
    sent: list[tuple[str, int]] = []

    async def send(tier: str, queued: int) -> None:
        if tier == "slow":
            await asyncio.sleep(10)  # a tier that does not take the report: dropped, not stuck
        sent.append((tier, queued))

    async def run() -> None:
        queue = Admission("small", max_in_flight=1, max_queued=8, max_wait_s=30)
        idle = Admission("large", max_in_flight=1, max_queued=8, max_wait_s=30)
        stuck = Admission("slow", max_in_flight=1, max_queued=8, max_wait_s=30)
        first = await queue.enter("a", "interactive", 1)
        waiting = [asyncio.create_task(queue.enter("b", "interactive", 1)) for _ in range(2)]
        await asyncio.sleep(0)
        for_stuck = await stuck.enter("a", "interactive", 1)
        blocked = asyncio.create_task(stuck.enter("b", "interactive", 1))
        await asyncio.sleep(0)
        reporter = asyncio.create_task(
            report_queues({"small": queue, "large": idle, "slow": stuck}, send, period_s=0.02)
        )
        await asyncio.sleep(0.1)
        assert ("small", 2) in sent
        queue.leave(first)
        for task in waiting:
            queue.leave(await task)
        stuck.leave(for_stuck)
        stuck.leave(await blocked)
        await asyncio.sleep(0.2)
        reporter.cancel()

    asyncio.run(run())
    small = [n for tier, n in sent if tier == "small"]
    assert small[0] == 2 and small[-1] == 0 and small.count(0) == 1
    assert all(tier != "large" for tier, _ in sent)  # nobody ever waited there
    assert all(tier != "slow" for tier, _ in sent)
