"""GPU binding on a real multi-GPU host: each replica's engine sees exactly its GPUs.

The engine's environment is built by the production launcher code and the process is started
and stopped by the production process code; only the program is a probe that reports what CUDA
shows it, holds GPU memory like an engine, and waits to be terminated.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys

import pytest

from serve_app.config import EngineConfig, TierConfig
from serve_app.engine.launcher import LaunchSpec, Ports, build_launch
from serve_app.engine.process import EngineProcess

from .conftest import gpu_uuids

PROBE = """
import json, sys, time, torch
held = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # 256 MiB, like an engine
print(json.dumps({"count": torch.cuda.device_count(),
                  "uuids": [str(torch.cuda.get_device_properties(i).uuid)
                            for i in range(torch.cuda.device_count())]}), flush=True)
time.sleep(600)
"""


def probe_spec(gpu_ids: list[str], replica: int) -> LaunchSpec:
    tier = TierConfig(name="large", gpus_per_replica=len(gpu_ids),
                      engine=EngineConfig(launcher="tgi", model_id="probe"))  # fmt: skip
    ports = Ports(8000 + replica, 9000 + replica, 29500 + replica, f"/tmp/probe-{replica}")
    spec = build_launch(tier, ports, gpu_ids, os.environ)
    return LaunchSpec(argv=(sys.executable, "-c", PROBE), env=spec.env)


async def run_replicas(assignments: list[list[str]]) -> list[dict[str, object]]:
    log = logging.LoggerAdapter(logging.getLogger("gpu-test"), {})
    engines = [EngineProcess(probe_spec(ids, i), log) for i, ids in enumerate(assignments)]
    for engine in engines:
        await engine.start()
    try:
        for _ in range(600):
            if all(e.tail or not e.alive() for e in engines):
                break
            await asyncio.sleep(0.1)
        return [json.loads(e.tail[-1]) for e in engines]
    finally:
        for engine in engines:
            await engine.terminate(timeout_s=10)
            assert not engine.alive()


def short(uuid: str) -> str:
    return uuid.removeprefix("GPU-").lower()


@pytest.mark.needs_gpus(2)
def test_two_replicas_with_one_gpu_each_see_different_gpus() -> None:
    physical = gpu_uuids()
    seen = asyncio.run(run_replicas([["0"], ["1"]]))
    assert [s["count"] for s in seen] == [1, 1]
    assert [short(s["uuids"][0]) for s in seen] == [short(physical[0]), short(physical[1])]


@pytest.mark.needs_gpus(2)
def test_a_two_gpu_replica_sees_both_in_order() -> None:
    physical = gpu_uuids()
    (seen,) = asyncio.run(run_replicas([["1", "0"]]))
    assert seen["count"] == 2
    assert [short(u) for u in seen["uuids"]] == [short(physical[1]), short(physical[0])]
