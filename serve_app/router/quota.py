"""Per-key quotas: requests and tokens per minute, and a daily token budget, one ledger for every
router replica.

The ledger keeps, per key, what was admitted in the last 60 seconds (a sliding window): a request
is admitted only if the requests, and the tokens it may use, still fit under the key's limits.
Admission *reserves* prompt + `max_tokens`; once the answer is done the reservation is settled
to the tokens actually used, and what was not used comes back at once. Nothing is leased to
router replicas, so the number of replicas changes nothing: in any 60 s the ledger admits at most
the limit, and a client below its limit is never refused. A key can overshoot its tokens only by
what its answers use beyond their reservation.

`QuotaLedger` is pure (a clock is injected); `Quotas` is a router replica's client of it,
bounded in time and with an explicit answer for a ledger that does not respond.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal, Protocol

from ..errors import QuotaExceeded, QuotaKind, QuotaUnavailable, RateLimit
from .auth import Tenant

logger = logging.getLogger("ray.serve")
WINDOW_S = 60.0


@dataclass
class _Entry:
    at: float
    amount: float
    live: bool = True


class SlidingWindow:
    """What one key used in the last `WINDOW_S`: one entry per admission."""

    def __init__(self) -> None:
        self._entries: deque[_Entry] = deque()
        self._used = 0.0

    def used(self, now: float) -> float:
        while self._entries and self._entries[0].at <= now - WINDOW_S:
            entry = self._entries.popleft()
            entry.live = False
            self._used -= entry.amount
        return self._used

    def add(self, now: float, amount: float) -> _Entry:
        self.used(now)
        entry = _Entry(now, amount)
        self._entries.append(entry)
        self._used += amount
        return entry

    def adjust(self, entry: _Entry, amount: float) -> None:
        """Settle a reservation to what was used (if it is still in the window)."""
        if entry.live:
            self._used += amount - entry.amount
            entry.amount = amount

    def wait_for(self, now: float, amount: float, limit: int) -> float:
        """Seconds until `amount` fits under `limit` (a full window when it never will)."""
        if amount > limit:
            return WINDOW_S
        excess = self.used(now) + amount - limit
        for entry in self._entries:
            if excess <= 0:
                break
            excess -= entry.amount
            if excess <= 0:
                return max(0.0, entry.at + WINDOW_S - now)
        return 0.0

    def reset_s(self, now: float) -> float:
        """Seconds until the window is empty again."""
        self.used(now)
        return max(0.0, self._entries[-1].at + WINDOW_S - now) if self._entries else 0.0


DAY_S = 86_400.0


class DailyTotal:
    """What one key used since 00:00 UTC (`at` of its entries: the day they belong to)."""

    def __init__(self) -> None:
        self._day = -1
        self._used = 0.0

    def _roll(self, wall: float) -> None:
        day = int(wall // DAY_S)
        if day != self._day:
            self._day, self._used = day, 0.0

    def used(self, wall: float) -> float:
        self._roll(wall)
        return self._used

    def add(self, wall: float, amount: float) -> _Entry:
        self._roll(wall)
        self._used += amount
        return _Entry(self._day, amount)

    def adjust(self, entry: _Entry, amount: float) -> None:
        """Settle a reservation to what was used (if it is of the current day)."""
        if entry.at == self._day:
            self._used += amount - entry.amount
            entry.amount = amount

    def wait_for(self, wall: float, amount: float, limit: int) -> float:
        """Seconds until the next day, when the budget starts again."""
        return (int(wall // DAY_S) + 1) * DAY_S - wall

    def reset_s(self, wall: float) -> float:
        return self.wait_for(wall, 0, 0)


@dataclass(frozen=True)
class Grant:
    id: int
    limits: tuple[RateLimit, ...]


@dataclass(frozen=True)
class Refusal:
    kind: QuotaKind
    retry_after_s: float
    limits: tuple[RateLimit, ...]


class QuotaLedger:
    """The shared windows. Limits travel with each call, so a key's new limits apply at once.
    `clock` times the minute windows; `wall` (seconds since the epoch) tells the UTC day of the
    daily budget."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._wall = wall
        self._requests: dict[str, SlidingWindow] = {}
        self._tokens: dict[str, SlidingWindow] = {}
        self._days: dict[str, DailyTotal] = {}
        # grant -> key, when, and the token entries to settle (minute window, day)
        self._pending: OrderedDict[int, tuple[str, float, list[tuple[_Window, _Entry]]]] = (
            OrderedDict()
        )
        self._ids = itertools.count(1)

    def reserve(
        self,
        key: str,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        tokens: int,
        tokens_per_day: int | None = None,
    ) -> Grant | Refusal:
        now, wall = self._clock(), self._wall()
        self._forget_stale(now)
        checks: list[_Check] = []
        if requests_per_minute:
            checks.append(_Check("requests", _window(self._requests, key), requests_per_minute,
                                 1, now))  # fmt: skip
        if tokens_per_minute:
            checks.append(_Check("tokens", _window(self._tokens, key), tokens_per_minute,
                                 tokens, now))  # fmt: skip
        if tokens_per_day:
            day = self._days.setdefault(key, DailyTotal())
            checks.append(_Check("budget", day, tokens_per_day, tokens, wall))
        for check in checks:
            if check.window.used(check.at) + check.amount > check.limit:
                wait = check.window.wait_for(check.at, check.amount, check.limit)
                return Refusal(check.kind, wait, _state(checks))
        grant_id = next(self._ids)
        settled = []
        for check in checks:
            entry = check.window.add(check.at, check.amount)
            if check.kind != "requests":
                settled.append((check.window, entry))
        if settled:
            self._pending[grant_id] = (key, now, settled)
        return Grant(grant_id, _state(checks))

    def settle(self, key: str, grant_id: int, tokens_used: int) -> None:
        found = self._pending.pop(grant_id, None)
        if found is not None and found[0] == key:
            for window, entry in found[2]:
                window.adjust(entry, max(0, tokens_used))

    def _forget_stale(self, now: float) -> None:
        """Reservations never settled (their router died) are left as reserved."""
        while self._pending:
            grant_id, (_, at, _) = next(iter(self._pending.items()))
            if at > now - WINDOW_S:
                break
            del self._pending[grant_id]


class _Window(Protocol):
    def used(self, at: float) -> float: ...
    def add(self, at: float, amount: float) -> _Entry: ...
    def adjust(self, entry: _Entry, amount: float) -> None: ...
    def wait_for(self, at: float, amount: float, limit: int) -> float: ...
    def reset_s(self, at: float) -> float: ...


@dataclass(frozen=True)
class _Check:
    kind: QuotaKind
    window: _Window
    limit: int
    amount: float
    at: float  # the clock the window keeps: monotonic for minutes, the wall for days


def _window(windows: dict[str, SlidingWindow], key: str) -> SlidingWindow:
    return windows.setdefault(key, SlidingWindow())


def _state(checks: list[_Check]) -> tuple[RateLimit, ...]:
    """Where the per-minute limits stand (OpenAI's headers; the daily budget has none)."""
    return tuple(
        RateLimit(
            c.kind,
            c.limit,
            max(0, math.floor(c.limit - c.window.used(c.at))),
            c.window.reset_s(c.at),
        )
        for c in checks
        if c.kind != "budget"
    )


class LedgerCalls(Protocol):
    """How a router replica reaches the ledger (a Serve handle)."""

    async def reserve(
        self,
        key: str,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        tokens: int,
        tokens_per_day: int | None = None,
    ) -> Grant | Refusal: ...

    async def settle(self, key: str, grant_id: int, tokens_used: int) -> None: ...


@dataclass(frozen=True)
class Reservation:
    tenant: str
    grant_id: int | None  # None: admitted without the ledger (on_ledger_failure: allow)
    limits: tuple[RateLimit, ...]


@dataclass(frozen=True)
class _Closed:
    """A key whose requests per minute were all used, as the ledger said: until `until`, at
    that limit, nothing of it can be admitted."""

    until: float
    requests_per_minute: int
    refusal: Refusal


class Quotas:
    """A router replica's admission against the ledger, bounded by `timeout_s`.

    A key the ledger refused for its requests per minute is refused here, without the ledger
    and before its body is read, until the ledger said a request would fit again (`check_open`):
    a key over its rate makes the router neither parse nor ask anything."""

    def __init__(
        self,
        ledger: LedgerCalls,
        timeout_s: float,
        on_failure: Literal["allow", "deny"],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ledger = ledger
        self._timeout_s = timeout_s
        self._on_failure = on_failure
        self._clock = clock
        self._closed: dict[str, _Closed] = {}

    def check_open(self, tenant: Tenant) -> None:
        """Raises `QuotaExceeded` while the key's requests per minute are known to be used."""
        closed = self._closed.get(tenant.name)
        if closed is None:
            return
        now = self._clock()
        if now >= closed.until or closed.requests_per_minute != tenant.requests_per_minute:
            del self._closed[tenant.name]  # over, or the key's limit changed since
            return
        left = closed.until - now
        raise exceeded(replace(closed.refusal, retry_after_s=left))

    async def reserve(self, tenant: Tenant, tokens: int) -> Reservation | None:
        """None for a key without quotas; raises `QuotaExceeded` or `QuotaUnavailable`."""
        if not (tenant.requests_per_minute or tenant.tokens_per_minute or tenant.tokens_per_day):
            return None
        try:
            async with asyncio.timeout(self._timeout_s):  # passes on a cancellation, always
                answer = await self._ledger.reserve(
                    tenant.name,
                    tenant.requests_per_minute,
                    tenant.tokens_per_minute,
                    tokens,
                    tenant.tokens_per_day,
                )
        except Exception as exc:  # the ledger's own failure, whatever Ray calls it
            logger.warning("quota ledger failed (%s): %s", self._on_failure, type(exc).__name__)
            if self._on_failure == "allow":
                return Reservation(tenant.name, None, ())
            raise QuotaUnavailable("the quota service is not answering; retry shortly") from None
        if isinstance(answer, Refusal):
            if answer.kind == "requests" and tenant.requests_per_minute:
                until = self._clock() + answer.retry_after_s
                self._closed[tenant.name] = _Closed(until, tenant.requests_per_minute, answer)
            raise exceeded(answer)
        return Reservation(tenant.name, answer.id, answer.limits)

    async def settle(self, reservation: Reservation, tokens_used: int) -> None:
        if reservation.grant_id is None:
            return
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._ledger.settle(reservation.tenant, reservation.grant_id, tokens_used)
        except Exception as exc:  # the reservation then stays as reserved: never under-charged
            logger.warning("quota settlement failed: %s", type(exc).__name__)


def exceeded(refusal: Refusal) -> QuotaExceeded:
    seconds = max(1, math.ceil(refusal.retry_after_s))
    if refusal.kind == "budget":
        hours, minutes = divmod(math.ceil(seconds / 60), 60)
        return QuotaExceeded(
            f"this API key has used its daily token budget; it starts again at 00:00 UTC "
            f"(in {hours}h{minutes:02d}m)",
            retry_after_s=seconds,
            kind="budget",
        )
    return QuotaExceeded(
        f"this API key has used its {refusal.kind} per minute; retry in {seconds}s",
        retry_after_s=seconds,
        kind=refusal.kind,
        limits=refusal.limits,
    )
