"""The quota ledger on a fake clock: sliding windows, reservations settled, and the refusal
rates a client sees with 1, 2 and 4 router replicas sharing one ledger."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import pytest

from serve_app.errors import QuotaExceeded, QuotaUnavailable
from serve_app.router.auth import Tenant
from serve_app.router.quota import (
    WINDOW_S,
    Grant,
    QuotaLedger,
    Quotas,
    Refusal,
    SlidingWindow,
    exceeded,
)

from .clock import Clock
from .doubles import InProcessLedger


def tenant(rpm: int | None = None, tpm: int | None = None) -> Tenant:
    return Tenant("t", b"", None, rpm, tpm)


def test_a_window_forgets_what_is_older_than_a_minute() -> None:
    window = SlidingWindow()
    window.add(0, 5)
    window.add(30, 5)
    assert window.used(59.9) == 10
    assert window.used(60.0) == 5
    assert window.wait_for(60.0, 10, 12) == pytest.approx(30.0)  # until the entry at 30 goes
    assert window.wait_for(60.0, 20, 12) == WINDOW_S  # never fits: a whole window
    assert window.reset_s(60.0) == pytest.approx(30.0)


def test_requests_are_admitted_up_to_the_limit_and_retry_after_says_when() -> None:
    clock = Clock()
    ledger = QuotaLedger(clock)
    grants = []
    for _ in range(3):
        grants.append(ledger.reserve("k", 3, None, 0))
        clock.now += 10
    refused = ledger.reserve("k", 3, None, 0)
    assert all(isinstance(g, Grant) for g in grants)
    assert isinstance(refused, Refusal) and refused.kind == "requests"
    assert refused.retry_after_s == pytest.approx(30.0)  # the first leaves the window at +60
    (state,) = refused.limits
    assert (state.kind, state.limit, state.remaining) == ("requests", 3, 0)
    clock.now += 30
    assert isinstance(ledger.reserve("k", 3, None, 0), Grant)


def test_a_token_reservation_is_settled_to_what_was_used() -> None:
    clock = Clock()
    ledger = QuotaLedger(clock)
    first = ledger.reserve("k", None, 1000, 600)
    assert isinstance(first, Grant)
    refused = ledger.reserve("k", None, 1000, 600)  # 600 + 600 > 1000 while the first runs
    assert isinstance(refused, Refusal) and refused.kind == "tokens"
    ledger.settle("k", first.id, 50)  # it used 50 of its 600
    assert isinstance(ledger.reserve("k", None, 1000, 600), Grant)
    over = ledger.reserve("k", None, 1000, 5000)  # larger than the whole budget
    assert isinstance(over, Refusal) and over.retry_after_s == WINDOW_S


def test_requests_refused_for_tokens_take_no_request() -> None:
    ledger = QuotaLedger(Clock())
    assert isinstance(ledger.reserve("k", 2, 100, 80), Grant)
    assert isinstance(ledger.reserve("k", 2, 100, 80), Refusal)
    assert isinstance(ledger.reserve("k", 2, 100, 10), Grant)  # the refused one cost nothing


def refusals(routers: int, share: float, limit: int = 600, minutes: int = 5) -> dict[str, Any]:
    """A client at `share` of its requests per minute, Poisson arrivals spread over `routers`
    replicas that share one ledger; what it is refused, and the most admitted in any minute."""
    clock = Clock()
    ledger = InProcessLedger(QuotaLedger(clock))
    replicas = [Quotas(ledger, 1.0, "deny") for _ in range(routers)]
    key = tenant(rpm=limit)
    rng = random.Random(routers * 1000 + int(share * 100))
    admitted: list[float] = []
    sent = refused = 0

    async def run() -> None:
        nonlocal sent, refused
        end = clock.now + minutes * 60
        while clock.now < end:
            clock.now += rng.expovariate(share * limit / 60)
            sent += 1
            try:
                await replicas[sent % routers].reserve(key, 0)
                admitted.append(clock.now)
            except QuotaExceeded:
                refused += 1

    asyncio.run(run())
    most = max(
        sum(1 for t in admitted if start <= t < start + 60) for start in admitted
    )  # the densest minute, any start
    return {"routers": routers, "share": share, "sent": sent, "refused": refused,
            "refusal_rate": round(refused / sent, 4), "max_admitted_per_minute": most}  # fmt: skip


@pytest.mark.parametrize("routers", [1, 2, 4])
def test_rpm_holds_with_any_number_of_router_replicas(routers: int) -> None:
    calm = refusals(routers, 0.5)
    flood = refusals(routers, 3.0)
    print(json.dumps({"calm": calm, "flood": flood}))
    assert calm["refused"] == 0
    assert flood["max_admitted_per_minute"] <= 600 * 1.05
    assert flood["max_admitted_per_minute"] >= 600 * 0.95  # and the limit is usable


class _Broken:
    async def reserve(self, *args: Any) -> Grant | Refusal:
        raise ConnectionError("ledger gone")

    async def settle(self, *args: Any) -> None:
        raise ConnectionError("ledger gone")


def test_a_failing_ledger_denies_or_allows_as_configured() -> None:
    deny = Quotas(_Broken(), 0.1, "deny")
    allow = Quotas(_Broken(), 0.1, "allow")
    with pytest.raises(QuotaUnavailable):
        asyncio.run(deny.reserve(tenant(rpm=5), 1))
    reservation = asyncio.run(allow.reserve(tenant(rpm=5), 1))
    assert reservation is not None and reservation.grant_id is None
    asyncio.run(allow.settle(reservation, 10))  # nothing to settle, nothing raised
    assert asyncio.run(deny.reserve(tenant(), 1)) is None  # no quotas: the ledger is not asked


class _Counting:
    """The in-process ledger, counting the calls that reach it."""

    def __init__(self, ledger: QuotaLedger) -> None:
        self.inner = InProcessLedger(ledger)
        self.calls = 0

    async def reserve(self, *args: Any) -> Grant | Refusal:
        self.calls += 1
        return await self.inner.reserve(*args)

    async def settle(self, *args: Any) -> None:
        await self.inner.settle(*args)


def test_a_key_over_its_rate_is_refused_without_the_ledger_until_a_request_fits() -> None:
    clock = Clock()
    ledger = _Counting(QuotaLedger(clock))
    quotas = Quotas(ledger, 1.0, "deny", clock)
    key = tenant(rpm=2)
    for _ in range(2):
        asyncio.run(quotas.reserve(key, 1))
    with pytest.raises(QuotaExceeded):
        asyncio.run(quotas.reserve(key, 1))
    assert ledger.calls == 3
    clock.now += 30
    with pytest.raises(QuotaExceeded) as refused:
        quotas.check_open(key)  # known to be full: the ledger is not asked
    assert refused.value.kind == "requests" and 29 <= refused.value.retry_after_s <= 30
    assert ledger.calls == 3
    quotas.check_open(tenant(rpm=10))  # the key's limit was raised since: asked again
    clock.now += 31
    quotas.check_open(key)  # the window has room again
    assert asyncio.run(quotas.reserve(key, 1)) is not None


def test_a_key_refused_for_tokens_is_not_closed() -> None:
    quotas = Quotas(InProcessLedger(QuotaLedger(Clock())), 1.0, "deny")
    key = tenant(tpm=10)
    with pytest.raises(QuotaExceeded):
        asyncio.run(quotas.reserve(key, 11))
    quotas.check_open(key)  # a smaller request may still fit


def test_a_daily_budget_refuses_once_spent_and_starts_again_at_midnight_utc() -> None:
    clock, wall = Clock(), Clock(now=1_796_601_600.0 + 15 * 3600)  # 15:00 UTC
    ledger = QuotaLedger(clock, wall)
    first = ledger.reserve("k", None, None, 600, tokens_per_day=1000)
    assert isinstance(first, Grant) and first.limits == ()  # no per-minute headers
    ledger.settle("k", first.id, 400)  # 400 used: 600 of the day left
    clock.now += 3600  # minute windows are long gone; the day is not
    wall.now += 3600
    assert isinstance(ledger.reserve("k", None, None, 600, tokens_per_day=1000), Grant)
    refused = ledger.reserve("k", None, None, 1, tokens_per_day=1000)
    assert isinstance(refused, Refusal) and refused.kind == "budget"
    assert refused.retry_after_s == 8 * 3600  # 16:00 -> midnight
    wall.now += 8 * 3600
    assert isinstance(ledger.reserve("k", None, None, 1000, tokens_per_day=1000), Grant)


def test_a_reservation_of_yesterday_settles_nothing_into_today() -> None:
    clock, wall = Clock(), Clock(now=1_796_601_600.0 - 10)  # ten seconds to midnight
    ledger = QuotaLedger(clock, wall)
    grant = ledger.reserve("k", None, None, 900, tokens_per_day=1000)
    assert isinstance(grant, Grant)
    wall.now += 20
    ledger.settle("k", grant.id, 900)
    assert isinstance(ledger.reserve("k", None, None, 1000, tokens_per_day=1000), Grant)


def test_a_spent_budget_is_insufficient_quota_and_says_when_it_returns() -> None:
    error = exceeded(Refusal("budget", 3 * 3600 + 61, ()))
    assert error.kind == "budget" and error.retry_after_s == 3 * 3600 + 61
    assert error.message.endswith("starts again at 00:00 UTC (in 3h02m)")
