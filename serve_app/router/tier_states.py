"""Where each tier stands, as a client should see it: from Serve's own status of the tier's
deployment and the start-up phases its replicas publish (`serve_app.tier.startup`).

    not_deployed   Serve has no deployment of the tier (yet)
    scheduling     the tier's replicas exist in Serve, but none runs its code yet (no resources)
    starting       a replica runs; nothing of its engine is started yet
    filling_cache  a replica fills the model cache
    loading        a replica's engine runs and loads the model
    idle           no replica, none wanted (a tier scaled to zero): a request starts one
    ready          at least one replica serves
    failed         Serve gave up starting the tier (DEPLOY_FAILED), or its replicas failed to
                   start and none is starting now (UNHEALTHY): `reason` says why (the
                   replica's own reason, else Serve's message)
    unknown        the router has not read Serve's status (yet)

Pure: `derive` is fed what `serve_app.router.tier_watch` reads in the background, never on the
request path; `TierBoard` holds the result for the routes and the dispatcher.
"""

from __future__ import annotations

import asyncio
import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..tier.startup import Phase, ReplicaPhase


class TierState(enum.StrEnum):
    UNKNOWN = "unknown"
    NOT_DEPLOYED = "not_deployed"
    SCHEDULING = "scheduling"
    STARTING = "starting"
    FILLING_CACHE = "filling_cache"
    LOADING = "loading"
    IDLE = "idle"
    READY = "ready"
    FAILED = "failed"


# A starting tier is as far as its furthest replica.
PROGRESS = {
    Phase.STARTING: TierState.STARTING,
    Phase.FILLING_CACHE: TierState.FILLING_CACHE,
    Phase.LOADING: TierState.LOADING,
    Phase.READY: TierState.LOADING,  # done, and Serve is about to say so
}
ORDER = [Phase.STARTING, Phase.FILLING_CACHE, Phase.LOADING, Phase.READY]
# Serve's replica states of a replica on its way up.
COMING_UP = {"STARTING", "UPDATING", "RECOVERING", "PENDING_MIGRATION"}
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colours in Serve's messages (a replica's traceback)
# Seconds a client is told to wait (`Retry-After`) in each state.
RETRY_AFTER_S = {
    TierState.FAILED: 60,
    TierState.NOT_DEPLOYED: 30,
    TierState.SCHEDULING: 30,
    TierState.FILLING_CACHE: 30,
    TierState.LOADING: 15,
    TierState.STARTING: 15,
}


@dataclass(frozen=True)
class ReplicaView:
    """One replica of the tier: Serve's state of it, and the phase it published."""

    replica: str
    serve_state: str
    phase: Phase | None = None
    since: float | None = None
    reason: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "serve_state": self.serve_state,
            "phase": self.phase.value if self.phase is not None else None,
            "since": self.since,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class TierStatus:
    tier: str
    state: TierState
    since: float  # when this state began (seconds since the epoch)
    reason: str | None = None
    replicas: tuple[ReplicaView, ...] = ()
    serve_status: str | None = None  # Serve's status of the deployment, as it says it
    serve_message: str | None = None  # and its message
    # The last failed start of a replica of the tier (`reason` of its phase), while none
    # serves: why a tier keeps starting.
    last_failure: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # further facts of the tier, for later

    @property
    def ready(self) -> bool:
        return self.state is TierState.READY

    def summary(self) -> dict[str, Any]:
        """The model list's `status` field: the state, since when, and the reason's first
        line."""
        return {"state": self.state.value, "since": self.since, "reason": first_line(self.reason)}

    def as_json(self) -> dict[str, Any]:
        """The status route's entry: everything."""
        return {
            "tier": self.tier,
            "state": self.state.value,
            "since": self.since,
            "reason": self.reason,
            "serve_status": self.serve_status,
            "serve_message": self.serve_message,
            "last_failure": self.last_failure,
            "replicas": [r.as_json() for r in self.replicas],
            **self.extra,
        }


def first_line(text: str | None, limit: int = 300) -> str | None:
    if not text:
        return None
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def find_deployment(
    applications: Mapping[str, Any], tier: str, app: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(application, deployment) of tier `tier` in Serve's details: the tier's own application
    (`app`, by default `tier-<name>`, whose deployment has its name), else any application
    holding that deployment (every tier bound into the router's application)."""
    name = app or f"tier-{tier}"
    ordered = sorted(applications.items(), key=lambda item: item[0] != name)
    for _, found in ordered:
        deployment = (found.get("deployments") or {}).get(name)
        if deployment is not None:
            return found, deployment
    return None


def derive(
    tier: str,
    applications: Mapping[str, Any],
    phases: Iterable[ReplicaPhase],
    now: float,
    previous: TierStatus | None = None,
    *,
    app: str | None = None,
    published: str | None = None,
) -> TierStatus:
    """The tier's status from Serve's details (`get_serve_instance_details()["applications"]`)
    and the phases its replicas published; `previous`: the status derived before, whose
    `since` carries on while the state stays. For one version of a tier (`tier` is then the
    router's key for it), `app` is its application and `published` the name its replicas
    publish their phases under (`serve_app.serve_config.version_id`)."""
    phases = [p for p in phases if p.tier == (published or tier)]
    by_replica = {p.replica: p for p in phases}
    app_name = app or f"tier-{tier}"
    found = find_deployment(applications, tier, app_name)

    def status(state: TierState, reason: str | None = None, **more: Any) -> TierStatus:
        since = more.pop("since", None)
        if since is None:
            kept = previous is not None and previous.state is state
            since = previous.since if kept and previous is not None else now
        return TierStatus(tier, state, since, reason, **more)

    if found is None:
        if app_name in applications:  # the application is there, its deployment not yet
            return status(TierState.SCHEDULING, "Serve is deploying the tier's application")
        return status(TierState.NOT_DEPLOYED, f"Serve has no application {app_name}")
    app, deployment = found
    serve_status = _text(deployment.get("status"))
    message = _text(deployment.get("message")) or _text(app.get("message")) or None
    message = ANSI.sub("", message) if message else None
    app_status = _text(app.get("status"))
    views = tuple(
        _view(replica, by_replica.get(str(replica.get("replica_id"))))
        for replica in deployment.get("replicas") or []
    )
    # The latest failed start of any replica since the tier was deployed and since one was last
    # ready (a failed replica is gone, or about to be).
    deployed = float(app.get("last_deployed_time_s") or 0.0)
    readied = max((p.since for p in phases if p.phase is Phase.READY), default=deployed)
    readied = max(readied, deployed)
    failures = sorted(
        (p for p in phases if p.phase is Phase.FAILED and p.since >= readied),
        key=lambda p: p.since,
    )
    last_failure = failures[-1].reason if failures else None
    common = {"replicas": views, "serve_status": serve_status or None, "serve_message": message}

    if any(v.serve_state == "RUNNING" for v in views):
        trouble = message if serve_status in ("UNHEALTHY", "DEPLOY_FAILED") else None
        return status(TierState.READY, trouble, **common)
    if serve_status == "DEPLOY_FAILED" or app_status == "DEPLOY_FAILED":
        return status(TierState.FAILED, last_failure or message, last_failure=last_failure,
                      **common)  # fmt: skip
    coming = [v for v in views if v.serve_state in COMING_UP]
    started = [
        by_replica[v.replica]
        for v in coming
        if v.replica in by_replica and by_replica[v.replica].phase is not Phase.FAILED
    ]
    earlier = f"the previous start failed: {first_line(last_failure)}" if last_failure else None
    if started:
        furthest = max(started, key=lambda p: (ORDER.index(p.phase), -p.since))
        return status(PROGRESS[furthest.phase], earlier, since=furthest.since,
                      last_failure=last_failure, **common)  # fmt: skip
    if coming:
        return status(TierState.SCHEDULING, earlier or "waiting for resources for a replica",
                      last_failure=last_failure, **common)  # fmt: skip
    if serve_status == "UNHEALTHY":  # replicas failed to start, and none is trying now
        return status(TierState.FAILED, last_failure or message, last_failure=last_failure,
                      **common)  # fmt: skip
    if serve_status in ("UPDATING", "UPSCALING") or app_status == "DEPLOYING":
        return status(TierState.SCHEDULING, earlier, last_failure=last_failure, **common)
    return status(TierState.IDLE, earlier or "no replica runs; a request starts one",
                  last_failure=last_failure, **common)  # fmt: skip


def _view(replica: Mapping[str, Any], phase: ReplicaPhase | None) -> ReplicaView:
    return ReplicaView(
        replica=str(replica.get("replica_id")),
        serve_state=_text(replica.get("state")),
        phase=phase.phase if phase is not None else None,
        since=phase.since if phase is not None else None,
        reason=first_line(phase.reason) if phase is not None else None,
    )


def _text(value: Any) -> str:
    """A field of Serve's details as text: its enums (str-valued) by their value."""
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value) if value is not None else ""


def describe(status: TierStatus, now: float) -> str:
    """The state in words, for a client that asked for the tier."""
    name, age = status.tier, max(0, round(now - status.since))
    text = {
        TierState.UNKNOWN: f"tier {name!r} has no running replica",
        TierState.NOT_DEPLOYED: f"tier {name!r} is not deployed",
        TierState.SCHEDULING: f"tier {name!r} is waiting for resources to start a replica "
        f"(for {age} s)",
        TierState.STARTING: f"tier {name!r} is starting a replica (started {age} s ago)",
        TierState.FILLING_CACHE: f"tier {name!r} is filling its model cache (started {age} s ago)",
        TierState.LOADING: f"tier {name!r} is loading its model (started {age} s ago)",
        TierState.IDLE: f"tier {name!r} has no replica running (scaled to zero)",
        TierState.READY: f"tier {name!r} is ready",
        TierState.FAILED: f"tier {name!r} failed to start",
    }[status.state]
    reason = first_line(status.reason)
    if status.state is TierState.FAILED and reason:
        text += f": {reason}"
    return text


def retry_after_s(status: TierStatus | None, default: int = 10) -> int:
    return RETRY_AFTER_S.get(status.state, default) if status is not None else default


class TierBoard:
    """Every tier's latest status, as the router's background watch last derived it."""

    def __init__(self) -> None:
        self._statuses: dict[str, TierStatus] = {}
        self._failed: dict[str, asyncio.Event] = {}

    def get(self, tier: str) -> TierStatus | None:
        return self._statuses.get(tier)

    def all(self) -> dict[str, TierStatus]:
        return dict(self._statuses)

    def put(self, status: TierStatus) -> None:
        self._statuses[status.tier] = status
        event = self._failed_event(status.tier)
        if status.state is TierState.FAILED:
            event.set()
        else:
            event.clear()

    def keep_only(self, tiers: Iterable[str]) -> None:
        kept = set(tiers)
        for name in list(self._statuses):
            if name not in kept:
                del self._statuses[name]
                self._failed.pop(name, None)

    def failed(self, tier: str) -> TierStatus | None:
        status = self._statuses.get(tier)
        return status if status is not None and status.state is TierState.FAILED else None

    async def until_failed(self, tier: str) -> TierStatus:
        """Returns once the tier is known to have failed."""
        while True:
            await self._failed_event(tier).wait()
            status = self.failed(tier)
            if status is not None:
                return status

    def _failed_event(self, tier: str) -> asyncio.Event:
        event = self._failed.get(tier)
        if event is None:
            event = self._failed[tier] = asyncio.Event()
        return event
