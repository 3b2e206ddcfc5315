"""A replica's start-up phases (`serve_app.tier.startup`): what is published, what a store or
an announcement that fails does to the start (nothing)."""

from __future__ import annotations

from serve_app.tier.startup import (
    MAX_REASON,
    Phase,
    ReplicaPhase,
    StartupPhases,
    phase_key,
    short_reason,
)


class MemoryStore:
    def __init__(self, broken: bool = False) -> None:
        self.data: dict[str, bytes] = {}
        self.broken = broken

    def put(self, key: str, value: bytes) -> None:
        if self.broken:
            raise ConnectionError("the GCS is away")
        self.data[key] = value

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def delete(self, key: str) -> None:
        if self.broken:
            raise ConnectionError("the GCS is away")
        self.data.pop(key, None)

    def keys(self, prefix: str) -> list[str]:
        return [k for k in self.data if k.startswith(prefix)]


def test_each_phase_is_published_under_the_replicas_key_and_announced() -> None:
    store, announced = MemoryStore(), []
    clock = iter([100.0, 105.0, 190.0])
    phases = StartupPhases("large", "r1", store, announced.append, "pod-a", lambda: next(clock))
    phases.set(Phase.STARTING)
    phases.set(Phase.LOADING)
    phases.set(Phase.READY)
    stored = ReplicaPhase.decode(store.data[phase_key("large", "r1")])
    assert stored == ReplicaPhase("large", "r1", Phase.READY, 190.0, None, "pod-a")
    assert [p.phase for p in announced] == [Phase.STARTING, Phase.LOADING, Phase.READY]
    phases.clear()
    assert store.data == {}


def test_a_failure_keeps_its_reason_within_bounds() -> None:
    store = MemoryStore()
    phases = StartupPhases("small", "r2", store)
    reason = "exited with code 1. Last output:\n" + "x" * 10_000 + "\nthe last line"
    phases.set(Phase.FAILED, reason)
    stored = ReplicaPhase.decode(store.data[phases.key])
    assert stored is not None and stored.phase is Phase.FAILED
    assert stored.reason is not None and len(stored.reason) <= MAX_REASON + 5
    assert stored.reason.startswith("exited with code 1") and stored.reason.endswith("last line")
    assert short_reason("short") == "short"


def test_a_store_or_announcement_that_fails_never_fails_the_start() -> None:
    def refuse(phase: ReplicaPhase) -> None:
        raise RuntimeError("the API server refused")

    phases = StartupPhases("small", "r3", MemoryStore(broken=True), refuse)
    assert phases.set(Phase.STARTING).phase is Phase.STARTING
    assert phases.set(Phase.READY).phase is Phase.READY
    phases.clear()


def test_anything_else_in_the_store_is_no_phase() -> None:
    assert ReplicaPhase.decode(b"not json") is None
    assert ReplicaPhase.decode(b'{"tier": "a", "replica": "b", "phase": "dancing"}') is None
    assert ReplicaPhase.decode(b"{}") is None


def test_a_failing_step_is_the_failed_phase_and_a_cancelled_one_leaves_none() -> None:
    import asyncio

    import pytest

    from serve_app.errors import EngineStartupError

    store = MemoryStore()
    phases = StartupPhases("small", "r1", store, clock=lambda: 5.0)
    with pytest.raises(EngineStartupError), phases.failing():
        raise EngineStartupError("the engine exited")
    assert phases.current is not None and phases.current.reason == "the engine exited"
    with pytest.raises(OSError), phases.failing():
        raise OSError("disk full")
    assert phases.current.phase is Phase.FAILED and phases.current.reason == "OSError: disk full"
    with pytest.raises(asyncio.CancelledError), phases.failing():
        raise asyncio.CancelledError
    assert store.data == {}
