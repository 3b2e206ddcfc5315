"""Per-key quotas that hold across router replicas.

One Ray actor, the ledger, keeps a token bucket per key for requests and one for tokens (both
refilled continuously up to their per-minute limit). Router replicas do not ask it on every
request: they take a lease of requests (`lease_fraction` of the limit) and spend it locally, and
report tokens after each answer.

Accuracy: requests are only admitted out of leases the ledger granted, so the cluster never
admits more than the limit; a lease unused for `LEASE_TTL_S` lapses, so it can hold back at most
(router replicas x lease) requests from other replicas for that long. Tokens are known only after
an answer: a key whose token bucket runs dry is refused from then until it refills, so it can
overshoot by the tokens of the requests already in flight.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import ray

from ..errors import QuotaExceeded
from .auth import Tenant

LEDGER_NAME = "serve_app_quota_ledger"
LEDGER_NAMESPACE = "serve_app"
LEASE_TTL_S = 5.0


@dataclass
class Bucket:
    level: float
    updated: float

    def refill(self, per_minute: int, now: float) -> None:
        self.level = min(per_minute, self.level + (now - self.updated) * per_minute / 60)
        self.updated = now

    def wait_for(self, amount: float, per_minute: int) -> float:
        """Seconds until `amount` is in the bucket."""
        return max(0.0, (amount - self.level) * 60 / per_minute)


class QuotaLedger:
    """The shared buckets (a named Ray actor); limits travel with each call."""

    def __init__(self) -> None:
        self._requests: dict[str, Bucket] = {}
        self._tokens: dict[str, Bucket] = {}

    def _bucket(self, buckets: dict[str, Bucket], key: str, per_minute: int) -> Bucket:
        now = time.monotonic()
        bucket = buckets.setdefault(key, Bucket(per_minute, now))
        bucket.refill(per_minute, now)
        return bucket

    def lease_requests(self, key: str, per_minute: int, want: int) -> tuple[int, float]:
        """Up to `want` requests; with none granted, how long until one is available."""
        bucket = self._bucket(self._requests, key, per_minute)
        granted = min(want, math.floor(bucket.level))
        bucket.level -= granted
        return granted, 0.0 if granted else bucket.wait_for(1, per_minute)

    def spend_tokens(self, key: str, per_minute: int, used: int) -> float:
        """Take `used` tokens; returns 0, or how long the key must wait once the bucket is dry."""
        bucket = self._bucket(self._tokens, key, per_minute)
        bucket.level -= used
        return 0.0 if bucket.level > 0 else bucket.wait_for(1, per_minute)

    def tokens_blocked_for(self, key: str, per_minute: int) -> float:
        bucket = self._bucket(self._tokens, key, per_minute)
        return 0.0 if bucket.level > 0 else bucket.wait_for(1, per_minute)


def ledger() -> ray.actor.ActorHandle:
    """The cluster's ledger, created by whichever router replica asks first."""
    return (
        ray.remote(QuotaLedger)
        .options(
            name=LEDGER_NAME,
            namespace=LEDGER_NAMESPACE,
            get_if_exists=True,
            lifetime="detached",  # outlives any one router replica
            num_cpus=0,
        )
        .remote()
    )


@dataclass
class Lease:
    remaining: int = 0
    expires: float = 0.0


class Quotas:
    """A router replica's view: leases of requests, and keys blocked on tokens."""

    def __init__(self, lease_fraction: float) -> None:
        self._ledger = ledger()
        self._fraction = lease_fraction
        self._leases: dict[str, Lease] = {}
        self._blocked_until: dict[str, float] = {}
        self._lock = asyncio.Lock()

    async def admit(self, tenant: Tenant) -> None:
        now = time.monotonic()
        if tenant.tokens_per_minute and self._blocked_until.get(tenant.name, 0) > now:
            raise _exceeded("tokens", self._blocked_until[tenant.name] - now)
        limit = tenant.requests_per_minute
        if not limit:
            return
        async with self._lock:
            lease = self._leases.setdefault(tenant.name, Lease())
            if lease.remaining == 0 or lease.expires < now:
                want = max(1, int(limit * self._fraction))
                granted, wait = await self._ledger.lease_requests.remote(tenant.name, limit, want)
                if not granted:
                    raise _exceeded("requests", wait)
                lease.remaining, lease.expires = granted, now + LEASE_TTL_S
            lease.remaining -= 1

    async def spend(self, tenant: Tenant, tokens: int) -> None:
        if not tenant.tokens_per_minute or tokens <= 0:
            return
        wait = await self._ledger.spend_tokens.remote(tenant.name, tenant.tokens_per_minute, tokens)
        if wait > 0:
            self._blocked_until[tenant.name] = time.monotonic() + wait


def _exceeded(what: str, wait_s: float) -> QuotaExceeded:
    seconds = max(1, math.ceil(wait_s))
    return QuotaExceeded(
        f"this API key has used its {what} per minute; retry in {seconds}s", retry_after_s=seconds
    )
