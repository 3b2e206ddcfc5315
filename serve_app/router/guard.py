"""Who may call, and how much: the key (with bounded headers), the tier it may use, and a quota
reservation that is settled with the tokens the answer used."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from ..errors import HeadersTooLarge
from ..tier.call import TierCall
from .accounting import Recorder, Usage
from .auth import KeyRing, Tenant
from .quota import Quotas, Reservation


class Guard:
    def __init__(
        self,
        keys: KeyRing | None,
        quotas: Quotas | None,
        recorder: Recorder,
        max_header_bytes: int,
    ) -> None:
        self._keys = keys
        self._quotas = quotas
        self._recorder = recorder
        self._max_header_bytes = max_header_bytes
        self._background: set[asyncio.Future[None]] = set()

    def identify(
        self, raw_headers: list[tuple[bytes, bytes]], headers: Mapping[str, str]
    ) -> Tenant | None:
        """The caller's tenant (None with keys off); raises on oversized headers or a bad key."""
        size = sum(len(name) + len(value) for name, value in raw_headers)
        if size > self._max_header_bytes:
            raise HeadersTooLarge(
                f"the request headers are {size} bytes, over the limit of {self._max_header_bytes}"
            )
        return None if self._keys is None else self._keys.authenticate(headers)

    async def admit(self, tenant: Tenant | None, tier: str, call: TierCall) -> Reservation | None:
        """The key may use this tier, and its quota holds this call's reservation."""
        if tenant is None:
            return None
        tenant.check_tier(tier)
        reservation = None
        if self._quotas is not None:
            reservation = await self._quotas.reserve(tenant, call.token_estimate)
        self._recorder.tenant_request(tenant.name, tier)
        return reservation

    def settle(
        self, tenant: Tenant | None, tier: str, reservation: Reservation | None, usage: Usage
    ) -> None:
        """Count the tokens used and settle the reservation (in the background: the request
        may be ending by cancellation, where nothing more can be awaited)."""
        if tenant is None:
            return
        self._recorder.tenant_tokens(tenant.name, tier, usage.total)
        if self._quotas is not None and reservation is not None:
            task = asyncio.ensure_future(self._quotas.settle(reservation, usage.total))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
