"""The tier deployment: each replica supervises one engine on the GPUs Ray gave it."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import ray
from ray import serve

from .. import pod_log
from ..autoscaling import (
    ENGINE_QUEUE,
    ENGINE_RUNNING,
    admission_stats,
    fresh_reports,
    rule_stats,
)
from ..config import QueueScaling, TierConfig, TracingConfig
from ..engine.client import EngineReply
from ..engine.sse import Batch
from ..engine.stats import parse_load
from ..engine.supervisor import EngineSupervisor
from ..engine.tgi_over_openai import tgi_info
from ..errors import EngineUnreachable
from ..kube_events import pod_events
from ..metrics import app_metrics
from ..router.leases import EngineLease, ReplicaLeases
from ..serve_config import version_id
from ..tracing import Tracing
from .call import TierCall
from .model_fill import ensure_model_cached, skip_reason
from .replica_choice import EngineState
from .startup import Phase, RayKV, StartupPhases

logger = logging.getLogger("ray.serve")
# The engine's output and its supervisor's messages: Ray's replica log, and the pod's log
engine_logger = logging.getLogger("ray.serve.engine")


class ReplicaLog(logging.LoggerAdapter):
    """Prefixes every engine line with the tier and replica it belongs to."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[tier={self.extra['tier']} replica={self.extra['replica']}] {msg}", kwargs


def node_address() -> str:
    """This node's address as Ray registered it (`ray start --node-ip-address`: loopback on the
    local stack, the pod's IP on KubeRay); a worker's own guess would be the machine's network
    address whatever the node says."""
    node = ray.get_runtime_context().get_node_id()
    for found in ray.nodes():
        if found["NodeID"] == node:
            return str(found["NodeManagerAddress"])
    return ray.util.get_node_ip_address()


@serve.deployment
class TierDeployment:
    """Forwards requests for one tier to this replica's engine, and lives and dies with it."""

    async def __init__(self, tier: TierConfig, tracing: TracingConfig | None = None) -> None:
        self._gpus = tier.gpus_per_replica
        self._metered_at = time.monotonic()  # the GPUs are held from here: GPU-seconds count
        self._tags = {"tier": tier.name}  # before anything that may fail: `_meter` needs them
        replica = serve.get_replica_context().replica_id.unique_id
        # What routers show of this replica until it serves (`serve_app.tier.startup`).
        events = pod_events()
        self.phases = StartupPhases(
            version_id(tier.name, tier.version),
            replica,
            RayKV(),
            events.announce if events is not None else None,
            pod=socket.gethostname(),
        )
        self.phases.set(Phase.STARTING)
        pod_log.attach(engine_logger)
        log = ReplicaLog(engine_logger, {"tier": tier.name, "replica": replica})
        # The model-cache fill: this tier's model into the shared cache before its engine
        # starts (a no-op without one, or for the local engine); a failed fill fails the start.
        if skip_reason(tier, os.environ) is None:
            self.phases.set(Phase.FILLING_CACHE)
        with self.phases.failing():
            await ensure_model_cached(tier, os.environ, log)
        gpu_ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
        # With the direct data path, routers on any node stream from the engine: it listens on
        # the node's address (its key keeps everyone else out); otherwise on loopback only.
        host = node_address() if tier.tuning.data_path == "direct" else "127.0.0.1"
        self._supervisor = EngineSupervisor(tier, gpu_ids, os.environ, log, tracing, host)
        self._tier = tier
        self._tracing = Tracing.configure(tracing, f"tier-{tier.name}")
        engine = tier.engine.tuning
        self._slots = engine.max_batch_size or engine.max_concurrent_requests
        # router replica -> (its admission queue's length, when it said so)
        self._admission_reports: dict[str, tuple[float, float]] = {}
        # The direct data path's leases (`serve_app.router.leases`). Routers keep this tier's
        # leases between requests unless it routes on its own or traces.
        self._leases = ReplicaLeases(
            tier.tuning.max_ongoing_requests,
            tier.request_timeout_s + tier.tuning.lease_reuse_s,
            kept=tier.keeps_leases and tracing is None,
            on_count=lambda held: app_metrics().engine_leases.set(held, self._tags),
        )
        # The scaling rule the replicas report (a tier of its own application), else none.
        self._rule: dict[str, float] = {}
        app_metrics().engine_starts.inc(1, self._tags)
        self._price(tier.tuning.gpu_hour_price_usd)
        with self.phases.failing():
            await self._supervisor.start(on_spawned=lambda: self.phases.set(Phase.LOADING))
        self.phases.set(Phase.READY)
        self._log = log
        self._watch = asyncio.create_task(self._end_with_engine())

    def reconfigure(self, live: dict[str, Any]) -> None:
        """A tier of its own application: the settings it applies live, without a restart
        (`serve_app.serve_config.tier_user_config`), at start and on every change."""
        self._rule = rule_stats(QueueScaling.model_validate(live.get("scaling") or {}))
        self._price(live.get("gpu_hour_price_usd"))

    def _price(self, usd: float | None) -> None:
        if usd is not None:
            app_metrics().gpu_hour_price.set(usd, self._tags)

    async def _end_with_engine(self) -> None:
        """An engine that exits while serving ends its replica at once. Routers then drop the
        replica from their choice at their next call to it, the Ray calls of the leases on it
        end (so routers give back the ones they keep), and Serve's controller starts a
        replacement at its next health check without waiting for three failed ones. Alive, a
        replica without an engine would take requests only to fail them, and draw more than
        its share, since it fails them fastest."""
        code = await self._supervisor.ended()
        if code is None:
            return  # stopped by Serve: scale-down, redeploy, shutdown
        self.phases.set(Phase.FAILED, f"engine exited with code {code} while serving")
        try:
            self._log.error(
                "engine exited with code %s while serving; this replica exits with it so that "
                "Serve replaces it. Last output:\n%s",
                code,
                "\n".join(self._supervisor.process.tail) or "(no output)",
            )
            await self._supervisor.stop()  # what is left of its process tree, its directory
            for handler in logging.getLogger().handlers + logger.handlers:
                handler.flush()
        finally:
            os._exit(1)

    async def lease(self, call: TierCall) -> AsyncIterator[EngineLease | None]:
        """The direct data path (`serve_app.router.leases`): the engine's address and key, then
        nothing until the router cancels the call once its request has ended, however it
        ended. Meanwhile Serve counts the request on this replica (`max_ongoing_requests`,
        replica choice, draining before the engine stops), and so does the
        `serve_app_engine_leases` gauge. A router that dies cancels the call with its
        connection; `request_timeout_s`, the longest a request may take, bounds it otherwise
        (plus `lease_reuse_s`, while a router may keep it for its next requests). A second
        item, `None`, tells a router that keeps leases to give this one back after its request:
        every slot of the replica is leased. `call` comes without its payload: the router sends
        that to the engine itself."""
        if not self._supervisor.process.alive():  # this replica is about to exit with it
            raise EngineUnreachable(f"the engine of a replica of tier {self._tier.name!r} exited")
        app_metrics().lease_grants.inc(1, self._tags)
        with self._tracing.span(f"tier {call.route}", call.trace, self._tier) as span:
            supervisor = self._supervisor
            engine = EngineLease(supervisor.url, supervisor.api_key, span.headers())
            async with aclosing(self._leases.grant(engine)) as items:
                async for item in items:
                    yield item

    # The relay data path. Both calls first yield `None`: the router then knows a replica has
    # taken the request, which bounds the wait for one (a tier starting from zero) apart from
    # the generation itself.
    # `trace` is the router's W3C context (see `serve_app.tracing`), empty when tracing is off.

    # The router cancels a call whose client went away: the engine request is closed with it.

    async def request(self, call: TierCall) -> AsyncIterator[EngineReply | None]:
        yield None
        with self._tracing.span(f"tier {call.route}", call.trace, self._tier) as span:
            reply = await self._supervisor.client.post(call.route, call.payload, span.headers())
            span.status(reply.status)
        yield reply

    async def stream(self, call: TierCall) -> AsyncIterator[Batch | None]:
        yield None
        with self._tracing.span(f"tier {call.route}", call.trace, self._tier) as span:
            async for batch in self._supervisor.client.stream(
                call.route, call.payload, span.headers()
            ):
                span.chunk()
                yield batch

    async def info(self) -> dict[str, Any]:
        """TGI's `/info`: the engine's own, or for an engine without one (vLLM), the tier's."""
        if self._tier.engine.protocol == "openai":
            return tgi_info(self._tier)
        return await self._supervisor.client.info()

    async def report_admission(self, router: str, queued: int) -> None:
        """A router replica's admission queue length for this tier (`serve_app.autoscaling`)."""
        self._admission_reports[router] = (float(queued), time.monotonic())

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """The engine's queue and running batch, and the routers' admission queues as they
        reported them here, for `serve_app.autoscaling`."""
        load = parse_load(await self._supervisor.client.metrics())
        app_metrics().engine_queue.set(load.queued, self._tags)
        app_metrics().engine_running.set(load.running, self._tags)
        self._admission_reports = fresh_reports(self._admission_reports, time.monotonic())
        queues = admission_stats(self._admission_reports)
        return {ENGINE_QUEUE: load.queued, ENGINE_RUNNING: load.running, **queues, **self._rule}

    async def record_routing_stats(self) -> dict[str, float]:
        """The engine's load, for `serve_app.tier.request_router` (tiers with `routing`)."""
        load = parse_load(await self._supervisor.client.metrics())
        state = EngineState(load.queued, load.running, self._slots, load.kv_pressure)
        return state.as_stats()

    async def check_health(self) -> None:
        """Serve asks every replica this every few seconds: the engine must answer. Also when
        the replica's GPU-seconds and its engine's queue are brought up to date, so that every
        tier has them, autoscaled or not."""
        await self._supervisor.check()
        self._meter()
        try:
            load = parse_load(await self._supervisor.client.metrics())
        except Exception:  # a gauge left as it was is not worth failing the health check
            return
        app_metrics().engine_queue.set(load.queued, self._tags)
        app_metrics().engine_running.set(load.running, self._tags)

    def _meter(self) -> None:
        now = time.monotonic()
        if self._gpus:
            app_metrics().gpu_seconds.inc(self._gpus * (now - self._metered_at), self._tags)
        self._metered_at = now

    async def __del__(self) -> None:
        self._meter()
        supervisor = getattr(self, "_supervisor", None)  # none yet when the fill failed
        if supervisor is not None:
            await supervisor.stop()
        phases = getattr(self, "phases", None)
        failed = (
            phases is not None
            and phases.current is not None
            and (phases.current.phase is Phase.FAILED)
        )
        if phases is not None and not failed:
            phases.clear()  # stopped in order; a failure stays for the routers to show


@serve.deployment
class TierEntry:
    """The top deployment of the application of a tier with `routing` (`serve_app.app.
    build_tier`); it holds the tier's deployment and does nothing: routers call that one."""

    def __init__(self, tier: Any) -> None:
        self._tier = tier
