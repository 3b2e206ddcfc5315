"""The router's background watch of every tier's state: every few seconds, Serve's status of the
tiers (one call to Serve's controller) and the phases their replicas published (Ray's key-value
store), derived into `serve_app.router.tier_states.TierBoard` and the `serve_app_tier_state`
gauge. Never on the request path: requests read the board."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from ..config import TierConfig
from ..serve_config import tier_app_name, version_id
from ..tier.startup import KEY_PREFIX, PhaseStore, ReplicaPhase
from .tier_states import TierBoard, TierState, TierStatus, derive

logger = logging.getLogger("ray.serve")

POLL_S = 3.0
ROUND_S = 10.0  # the longest one round (Serve's details and the phases) may take
# A phase key of a replica Serve no longer has is removed after this long (a failure stays
# shown meanwhile); a replica that stops in order removes its own.
STALE_S = 600.0

Details = Callable[[], Awaitable[dict[str, Any]]]
StateGauge = Callable[[str, TierState, float], None]


def read_phases(store: PhaseStore) -> list[tuple[str, ReplicaPhase]]:
    """Every published phase, with its key (blocking: run it on a thread)."""
    found = []
    for key in store.keys(KEY_PREFIX):
        raw = store.get(key)
        phase = ReplicaPhase.decode(raw) if raw is not None else None
        if phase is not None:
            found.append((key, phase))
    return found


def stale_keys(
    phases: Iterable[tuple[str, ReplicaPhase]], applications: dict[str, Any], now: float
) -> list[str]:
    """Keys of replicas that Serve no longer has, published more than `STALE_S` ago."""
    live = {
        str(replica.get("replica_id"))
        for app in applications.values()
        for deployment in (app.get("deployments") or {}).values()
        for replica in deployment.get("replicas") or []
    }
    return [
        key for key, phase in phases if phase.replica not in live and now - phase.since > STALE_S
    ]


class TierWatch:
    def __init__(
        self,
        board: TierBoard,
        store: PhaseStore,
        details: Details,
        gauge: StateGauge | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._board = board
        self._store = store
        self._details = details
        self._gauge = gauge
        self._clock = clock
        self._tiers: dict[str, tuple[str | None, str | None]] = {}  # key -> (app, published)
        self._failing = False

    def tiers(self, names: Iterable[str] | Mapping[str, TierConfig]) -> None:
        """The tiers configured now (a router's live reconfiguration): names, or every version
        under the router's key for it (`serve_app.router.versions.targets`)."""
        before = set(self._tiers)
        if isinstance(names, Mapping):
            self._tiers = {
                key: (tier_app_name(t.name, t.version), version_id(t.name, t.version))
                for key, t in names.items()
            }
        else:
            self._tiers = dict.fromkeys(names, (None, None))
        self._board.keep_only(list(self._tiers))
        if self._gauge is not None:  # a version or tier gone: no series left at 1
            for gone in before - set(self._tiers):
                for state in TierState:
                    self._gauge(gone, state, 0.0)

    async def once(self) -> dict[str, TierStatus]:
        details = await self._details()
        applications = details.get("applications") or {}
        phases = await asyncio.to_thread(read_phases, self._store)
        now = self._clock()
        for tier, (app, published) in self._tiers.items():
            status = derive(tier, applications, (p for _, p in phases), now,
                            self._board.get(tier), app=app, published=published)  # fmt: skip
            self._board.put(status)
            if self._gauge is not None:
                for state in TierState:
                    self._gauge(tier, state, 1.0 if state is status.state else 0.0)
        stale = stale_keys(phases, applications, now)
        if stale:
            await asyncio.to_thread(lambda: [self._store.delete(key) for key in stale])
        return self._board.all()

    async def run(self, every_s: float = POLL_S) -> None:
        """Forever, every `every_s`; a failed round is logged once until one succeeds."""
        while True:
            try:
                async with asyncio.timeout(max(ROUND_S, 2 * every_s)):  # a hung controller call
                    await self.once()
                self._failing = False
            except Exception as exc:
                if not self._failing:
                    logger.warning("the tiers' states could not be read: %s", exc)
                self._failing = True
            await asyncio.sleep(every_s)


class ControllerDetails:
    """Serve's details of every application, from its controller (one Ray call)."""

    def __init__(self) -> None:
        self._controller: Any = None

    async def __call__(self) -> dict[str, Any]:
        import ray
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        if self._controller is None:
            self._controller = await asyncio.to_thread(
                ray.get_actor, SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE
            )
        try:
            details: dict[str, Any] = await self._controller.get_serve_instance_details.remote()
        except Exception:
            self._controller = None  # found afresh next time (a restarted controller)
            raise
        return details
