"""The model-cache fill in a real replica start (real Ray Serve, a real huggingface_hub child
process): a vLLM tier (on CPU: TGI needs GPUs) whose replicas see a shared model cache and a hub
that refuses connections fails its start with the fill's reason, in Serve's status and in the
pod's log, leaves the reason beside the model's marker, and never starts an engine."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack import localstack
from devstack.hosts import free_port
from devstack.local_ray import Head
from serve_app.pod_log import ENV as POD_LOG_ENV
from serve_app.tier.model_fill import MODEL_CACHE_ENV, failed_path, marker_path

from .conftest import Stack
from .test_supervision import one_tier

MODEL = "org/model-behind-an-unreachable-hub"


@pytest.fixture(scope="module")
def cached_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Path]]:
    """A Ray head whose processes have a shared model cache, as tier pods on the `gpu` overlay
    have, and a hub that refuses connections."""
    workdir = tmp_path_factory.mktemp("stack")
    cache = tmp_path_factory.mktemp("models")
    env = localstack.ray_env()
    env["TMPDIR"] = str(tmp_path_factory.mktemp("replicas"))
    env[POD_LOG_ENV] = str(workdir / "pod.log")
    env.update({MODEL_CACHE_ENV: str(cache), "HF_HOME": str(cache),
                "HUGGINGFACE_HUB_CACHE": str(cache / "hub"), "HF_HUB_OFFLINE": "1",
                "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"})  # fmt: skip
    head = localstack.start_head(Head.private(), env)
    try:
        yield Stack(head, env, free_port(), workdir), cache
    finally:
        localstack.stop_head(head)


def test_a_failed_fill_fails_the_replica_start_with_its_reason(
    cached_stack: tuple[Stack, Path],
) -> None:
    stack, cache = cached_stack
    config = one_tier(engine={"launcher": "vllm", "model_id": MODEL},
                      tuning={"max_start_attempts": 1})  # fmt: skip
    engine = config["applications"][0]["args"]["tiers"][0]["engine"]
    engine["tuning"].pop("threads", None)  # the local engine's only
    stack.deploy(copy.deepcopy(config), wait=False)
    with pytest.raises(RuntimeError) as failure:
        localstack.wait_running(stack.head, timeout_s=180)
    message = str(failure.value)
    print("SERVE-STATUS:", message)
    print("POD-LOG:", (stack.workdir / "pod.log").read_text()[-3000:])
    assert f"filling the model cache with {MODEL} failed" in message
    assert "Connection refused" in message
    reason = failed_path(marker_path(cache, MODEL, None)).read_text()
    assert "Connection refused" in reason
    assert not marker_path(cache, MODEL, None).exists()
    # the pod's log (`kubectl logs`) says it too, with the tier and replica
    log = (stack.workdir / "pod.log").read_text()
    assert f"filling the model cache with {MODEL} failed" in log and "[tier=small" in log
    assert not stack.engines()  # the engine never started
