"""A tier replica's start-up phase, published as it goes so that routers can tell a tier that is
starting from one that is dead.

    starting       the replica's code runs; nothing is started yet
    filling_cache  the replica fills the model cache before its engine starts
    loading        the engine process runs but is not healthy yet (weights loading)
    ready          the engine serves the tier's model
    failed         start-up failed (`reason`: why, with the engine's last output)

A replica sets each phase with `StartupPhases.set`; whatever runs at its start (a model-cache
fill, say) calls `set(Phase.FILLING_CACHE)` before its work and leaves the next phase to the
replica. Each phase goes to Ray's internal key-value store (one key per replica, read by the
routers' `serve_app.router.tier_states`) and, in a Kubernetes pod, to an Event on the pod
(`serve_app.kube_events`). Neither may fail a start: a store or API server that refuses is
logged once and otherwise ignored.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Protocol

from ..errors import EngineStartupError

logger = logging.getLogger("ray.serve")

KV_NAMESPACE = "serve_app"
KEY_PREFIX = "tier-phase/"
MAX_REASON = 4000  # characters of a failure's reason kept (its last output lines come last)


class Phase(enum.StrEnum):
    STARTING = "starting"
    FILLING_CACHE = "filling_cache"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class ReplicaPhase:
    """One replica's phase since `since` (seconds since the epoch)."""

    tier: str
    replica: str  # Serve's replica id (its `unique_id`)
    phase: Phase
    since: float
    reason: str | None = None
    pod: str | None = None  # the host (on Kubernetes: the pod) the replica runs in

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, raw: bytes) -> ReplicaPhase | None:
        """None for anything that is not a phase this version knows."""
        try:
            data = json.loads(raw)
            return cls(
                tier=str(data["tier"]),
                replica=str(data["replica"]),
                phase=Phase(data["phase"]),
                since=float(data["since"]),
                reason=data.get("reason"),
                pod=data.get("pod"),
            )
        except (ValueError, KeyError, TypeError):
            return None


def phase_key(tier: str, replica: str) -> str:
    return f"{KEY_PREFIX}{tier}/{replica}"


def short_reason(reason: str) -> str:
    """A failure's reason within `MAX_REASON`: its start, and its end (the engine's last
    output), which tells most."""
    if len(reason) <= MAX_REASON:
        return reason
    half = MAX_REASON // 2
    return f"{reason[:half]}\n...\n{reason[-half:]}"


class PhaseStore(Protocol):
    def put(self, key: str, value: bytes) -> None: ...
    def get(self, key: str) -> bytes | None: ...
    def delete(self, key: str) -> None: ...
    def keys(self, prefix: str) -> list[str]: ...


class RayKV:
    """Ray's internal key-value store (the GCS), under the project's own namespace."""

    def put(self, key: str, value: bytes) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(key, value, overwrite=True, namespace=KV_NAMESPACE)

    def get(self, key: str) -> bytes | None:
        from ray.experimental import internal_kv

        value = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
        return bytes(value) if value is not None else None

    def delete(self, key: str) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_del(key, namespace=KV_NAMESPACE)

    def keys(self, prefix: str) -> list[str]:
        from ray.experimental import internal_kv

        found = internal_kv._internal_kv_list(prefix, namespace=KV_NAMESPACE)
        return [k.decode() for k in found]


Announce = Callable[[ReplicaPhase], None]


class StartupPhases:
    """One replica's phases: each `set` is published to `store` and handed to `announce` (a
    Kubernetes Event); `clear` takes the replica's key away when it stops in order."""

    def __init__(
        self,
        tier: str,
        replica: str,
        store: PhaseStore | None,
        announce: Announce | None = None,
        pod: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._tier = tier
        self._replica = replica
        self._store = store
        self._announce = announce
        self._pod = pod
        self._clock = clock
        self._warned = False
        self.current: ReplicaPhase | None = None

    def set(self, phase: Phase, reason: str | None = None) -> ReplicaPhase:
        current = ReplicaPhase(
            self._tier,
            self._replica,
            phase,
            self._clock(),
            short_reason(reason) if reason is not None else None,
            self._pod,
        )
        self.current = current
        logger.info("tier %s replica %s: %s", self._tier, self._replica, phase.value)
        self._guarded(lambda store: store.put(self.key, current.encode()))
        if self._announce is not None:
            try:
                self._announce(current)
            except Exception as exc:  # an announcement never fails a start
                self._warn(exc)
        return current

    @contextlib.contextmanager
    def failing(self) -> Iterator[None]:
        """A start-up step: its failure is the replica's `FAILED` phase, with the reason; a
        cancellation (the replica is being stopped) leaves no phase to show."""
        try:
            yield
        except EngineStartupError as exc:
            self.set(Phase.FAILED, exc.message)
            raise
        except Exception as exc:
            self.set(Phase.FAILED, f"{type(exc).__name__}: {exc}")
            raise
        except BaseException:
            self.clear()
            raise

    def clear(self) -> None:
        self._guarded(lambda store: store.delete(self.key))

    @property
    def key(self) -> str:
        return phase_key(self._tier, self._replica)

    def _guarded(self, act: Callable[[PhaseStore], None]) -> None:
        if self._store is None:
            return
        try:
            act(self._store)
        except Exception as exc:
            self._warn(exc)

    def _warn(self, exc: Exception) -> None:
        if not self._warned:
            self._warned = True
            logger.warning(
                "tier %s replica %s: its start-up phase could not be published (%s); routers "
                "show the tier from Serve's status alone",
                self._tier, self._replica, exc,
            )  # fmt: skip
