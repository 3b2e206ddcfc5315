"""The quota ledger as a deployment of the application: one replica, restarted by Serve when it
dies (its windows start empty again), replaced with new code on every redeploy, gone with the
application."""

from __future__ import annotations

from ray import serve
from ray.serve.handle import DeploymentHandle

from .quota import Grant, QuotaLedger, Refusal


@serve.deployment
class LedgerDeployment:
    def __init__(self) -> None:
        self._ledger = QuotaLedger()

    def reserve(
        self,
        key: str,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        tokens: int,
        tokens_per_day: int | None = None,
    ) -> Grant | Refusal:
        return self._ledger.reserve(
            key, requests_per_minute, tokens_per_minute, tokens, tokens_per_day
        )

    def settle(self, key: str, grant_id: int, tokens_used: int) -> None:
        self._ledger.settle(key, grant_id, tokens_used)


class ServeLedger:
    """`LedgerCalls` over the ledger deployment's handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle

    async def reserve(
        self,
        key: str,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        tokens: int,
        tokens_per_day: int | None = None,
    ) -> Grant | Refusal:
        answer: Grant | Refusal = await self._handle.reserve.remote(
            key, requests_per_minute, tokens_per_minute, tokens, tokens_per_day
        )
        return answer

    async def settle(self, key: str, grant_id: int, tokens_used: int) -> None:
        await self._handle.settle.remote(key, grant_id, tokens_used)
