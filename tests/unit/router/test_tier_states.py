"""Each tier's state from Serve's details and its replicas' phases
(`serve_app.router.tier_states`), the words a client reads, and the background watch that
keeps the board (`serve_app.router.tier_watch`)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from serve_app.router.tier_states import (
    TierBoard,
    TierState,
    TierStatus,
    derive,
    describe,
    retry_after_s,
)
from serve_app.router.tier_watch import TierWatch, stale_keys
from serve_app.tier.startup import Phase, ReplicaPhase, StartupPhases

from ..tier.test_startup import MemoryStore

NOW = 1_000.0
REASON = (
    "engine for tier 'large' exited with code 1 during start-up. Last output:\n"
    "'/models/missing.gguf' is neither a built-in model nor a file"
)


def apps(status: str = "HEALTHY", app_status: str = "RUNNING", message: str = "",
         **replicas: str) -> dict[str, Any]:  # fmt: skip
    deployment = {
        "status": status,
        "message": message,
        "replicas": [{"replica_id": r, "state": s} for r, s in replicas.items()],
    }
    return {"tier-large": {"status": app_status, "message": "", "deployments": {
        "tier-large": deployment}}}  # fmt: skip


def phase(replica: str, p: Phase, since: float = 900.0, reason: str | None = None) -> ReplicaPhase:
    return ReplicaPhase("large", replica, p, since, reason)


@pytest.mark.parametrize(
    ("details", "phases", "state"),
    [
        ({}, [], TierState.NOT_DEPLOYED),
        (apps("UPDATING", "DEPLOYING", r1="STARTING"), [], TierState.SCHEDULING),
        (apps("UPDATING", "DEPLOYING", r1="STARTING"), [phase("r1", Phase.STARTING)],
         TierState.STARTING),
        (apps("UPDATING", "DEPLOYING", r1="STARTING", r2="STARTING"),
         [phase("r1", Phase.STARTING), phase("r2", Phase.LOADING)], TierState.LOADING),
        (apps("UPDATING", "DEPLOYING", r1="STARTING"), [phase("r1", Phase.FILLING_CACHE)],
         TierState.FILLING_CACHE),
        (apps("UPSCALING", r1="RUNNING", r2="STARTING"),
         [phase("r1", Phase.READY), phase("r2", Phase.LOADING)], TierState.READY),
        (apps("HEALTHY"), [], TierState.IDLE),
        (apps("UPSCALING"), [], TierState.SCHEDULING),
        (apps("DEPLOY_FAILED", "DEPLOY_FAILED", message=REASON), [], TierState.FAILED),
        # a tier at zero whose replica failed to start: Serve says UNHEALTHY and tries no more
        (apps("UNHEALTHY", message=REASON), [], TierState.FAILED),
        (apps("UNHEALTHY", r2="STARTING"), [phase("r2", Phase.LOADING)], TierState.LOADING),
        # a phase of a replica Serve no longer has counts for nothing but its failure
        (apps("UPDATING", "DEPLOYING", r2="STARTING"), [phase("r1", Phase.LOADING)],
         TierState.SCHEDULING),
    ],
)  # fmt: skip
def test_the_state_follows_serve_and_the_furthest_replica(
    details: dict[str, Any], phases: list[ReplicaPhase], state: TierState
) -> None:
    assert derive("large", details, phases, NOW).state is state


def test_a_failed_tier_says_why_and_is_refused_longest() -> None:
    failed = derive("large", apps("DEPLOY_FAILED", "DEPLOY_FAILED", message=REASON), [], NOW)
    assert failed.reason == REASON
    assert describe(failed, NOW) == (
        "tier 'large' failed to start: engine for tier 'large' exited with code 1 during "
        "start-up. Last output:"
    )
    assert failed.summary()["reason"].startswith("engine for tier 'large' exited with code 1")
    assert retry_after_s(failed) == 60


def test_the_replicas_own_reason_comes_before_serves_message() -> None:
    phases = [phase("r1", Phase.FAILED, 950.0, REASON)]
    serve = "The deployment failed to start 1 times in a row.\x1b[36mray::ServeReplica\x1b[39m"
    failed = derive("large", apps("UNHEALTHY", message=serve), phases, NOW)
    assert failed.state is TierState.FAILED
    assert failed.reason == REASON and failed.last_failure == REASON
    assert (
        failed.serve_message == "The deployment failed to start 1 times in a row.ray::ServeReplica"
    )
    failed = derive("large", apps("DEPLOY_FAILED", "DEPLOY_FAILED"), phases, NOW)
    assert failed.reason == REASON
    # a failure from before the tier's last deploy is not this deploy's
    redeployed = apps("DEPLOY_FAILED", "DEPLOY_FAILED", message="Serve's own")
    redeployed["tier-large"]["last_deployed_time_s"] = 960.0
    assert derive("large", redeployed, phases, NOW).reason == "Serve's own"


def test_a_retried_start_tells_that_the_previous_one_failed() -> None:
    phases = [phase("r1", Phase.FAILED, 950.0, REASON), phase("r2", Phase.LOADING, 960.0)]
    status = derive("large", apps("UPDATING", "DEPLOYING", r2="STARTING"), phases, NOW)
    assert status.state is TierState.LOADING and status.since == 960.0
    assert status.reason == f"the previous start failed: {REASON.splitlines()[0]}"
    # once a replica was ready since, an older failure is history
    phases.append(phase("r3", Phase.READY, 970.0))
    later = derive("large", apps("UPDATING", r2="STARTING", r3="STOPPING"), phases, NOW)
    assert later.last_failure is None


def test_the_loading_message_says_for_how_long() -> None:
    status = derive("large", apps("UPDATING", "DEPLOYING", r1="STARTING"),
                    [phase("r1", Phase.LOADING, NOW - 95)], NOW)  # fmt: skip
    assert describe(status, NOW) == "tier 'large' is loading its model (started 95 s ago)"
    assert retry_after_s(status) == 15
    view = status.as_json()["replicas"][0]
    assert view == {"replica": "r1", "serve_state": "STARTING", "phase": "loading",
                    "since": NOW - 95, "reason": None}  # fmt: skip


def test_a_state_keeps_its_start_while_it_lasts() -> None:
    first = derive("large", apps("UPDATING", "DEPLOYING", r1="STARTING"), [], NOW)
    again = derive("large", apps("UPDATING", "DEPLOYING", r1="STARTING"), [], NOW + 30, first)
    assert again.state is TierState.SCHEDULING and again.since == NOW
    assert describe(again, NOW + 30) == (
        "tier 'large' is waiting for resources to start a replica (for 30 s)"
    )


def test_tiers_bound_into_the_routers_application_are_found_there() -> None:
    bundled = {"llm": {"status": "RUNNING", "deployments": {
        "tier-large": {"status": "HEALTHY", "replicas": [{"replica_id": "r", "state": "RUNNING"}]},
    }}}  # fmt: skip
    assert derive("large", bundled, [], NOW).state is TierState.READY


def test_the_board_wakes_a_wait_when_the_tier_fails() -> None:
    async def scenario() -> TierStatus:
        board = TierBoard()
        waiting = asyncio.ensure_future(board.until_failed("large"))
        board.put(TierStatus("large", TierState.LOADING, NOW))
        await asyncio.sleep(0)
        assert not waiting.done()
        board.put(TierStatus("large", TierState.FAILED, NOW, REASON))
        return await asyncio.wait_for(waiting, 1)

    assert asyncio.run(scenario()).reason == REASON


def test_the_watch_derives_every_tier_exports_the_gauge_and_drops_stale_keys() -> None:
    store = MemoryStore()
    StartupPhases("large", "r1", store, clock=lambda: 990.0).set(Phase.LOADING)
    StartupPhases("large", "gone", store, clock=lambda: 100.0).set(Phase.LOADING)
    gauge: dict[tuple[str, str], float] = {}

    async def details() -> dict[str, Any]:
        return {"applications": apps("UPDATING", "DEPLOYING", r1="STARTING")}

    board = TierBoard()
    watch = TierWatch(board, store, details,
                      lambda tier, state, v: gauge.__setitem__((tier, state.value), v),
                      clock=lambda: NOW)  # fmt: skip
    watch.tiers(["large"])
    statuses = asyncio.run(watch.once())
    assert statuses["large"].state is TierState.LOADING
    assert gauge[("large", "loading")] == 1.0 and gauge[("large", "ready")] == 0.0
    assert sum(gauge.values()) == 1.0
    assert list(store.data) == ["tier-phase/large/r1"]  # "gone": Serve has it no more, long ago
    assert stale_keys([], {}, NOW) == []


def test_serves_enums_read_as_their_values() -> None:
    from ray.serve._private.common import DeploymentStatus, ReplicaState

    details = apps(DeploymentStatus.UPDATING, "DEPLOYING", r1=ReplicaState.STARTING)
    status = derive("large", details, [phase("r1", Phase.LOADING)], NOW)
    assert status.state is TierState.LOADING and status.serve_status == "UPDATING"
    assert status.replicas[0].serve_state == "STARTING"


def test_each_version_of_a_tier_is_watched_in_its_own_application() -> None:
    from serve_app.config import TierConfig

    store = MemoryStore()
    # the stable version's replica is ready, the candidate's (another application) loading
    StartupPhases("large@v1", "s1", store, clock=lambda: 900.0).set(Phase.READY)
    StartupPhases("large@v2", "c1", store, clock=lambda: 990.0).set(Phase.LOADING)

    def app(name: str, replica: str, state: str) -> dict[str, Any]:
        deployment = {"status": "UPDATING", "message": "",
                      "replicas": [{"replica_id": replica, "state": state}]}  # fmt: skip
        return {"status": "DEPLOYING", "message": "", "deployments": {name: deployment}}

    async def details() -> dict[str, Any]:
        stable = app("tier-large@v1", "s1", "RUNNING")
        candidate = app("tier-large@v2", "c1", "STARTING")
        return {"applications": {"tier-large@v1": stable, "tier-large@v2": candidate}}

    board = TierBoard()
    watch = TierWatch(board, store, details, clock=lambda: NOW)
    stable = TierConfig.model_validate({"name": "large", "version": "v1"})
    candidate = TierConfig.model_validate({"name": "large", "version": "v2"})
    watch.tiers({"large": stable, "large@v2": candidate})
    statuses = asyncio.run(watch.once())
    assert statuses["large"].state is TierState.READY
    assert statuses["large@v2"].state is TierState.LOADING
    assert [v.replica for v in statuses["large@v2"].replicas] == ["c1"]
