"""The model-cache fill against a temporary cache: its marker, lock and failure reason, with
downloads that write files or fail as a real one would, another replica that holds the lock
(a separate process), and huggingface_hub itself failing fast when the hub cannot be reached."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serve_app.config import EngineConfig, TierConfig
from serve_app.engine.launcher import HF_TOKEN_PATH_ENV
from serve_app.tier.model_fill import (
    MODEL_CACHE_ENV,
    FillRequest,
    ModelFillError,
    download_environ,
    ensure_model_cached,
    failed_path,
    lock_path,
    marker_path,
    skip_reason,
    weight_files,
)

MODEL = "org/gated-model"
LOG = logging.LoggerAdapter(logging.getLogger("test.model_fill"), {})


def tgi_tier(model: str = MODEL, revision: str | None = None, timeout_s: float = 60) -> TierConfig:
    engine = EngineConfig(launcher="tgi", model_id=model, revision=revision,
                          tuning={"startup_timeout_s": timeout_s})  # fmt: skip
    return TierConfig(name="small", gpus_per_replica=1, engine=engine)


def cached(tmp: Path, **more: str) -> dict[str, str]:
    return {MODEL_CACHE_ENV: str(tmp), "HUGGINGFACE_HUB_CACHE": str(tmp / "hub"),
            "HF_HUB_OFFLINE": "1", **more}  # fmt: skip


class Hub:
    """Downloads that do what a download does: write the model's files into the cache, or fail
    with the hub's error. Counts its calls."""

    def __init__(self, error: str | None = None, hold: asyncio.Event | None = None) -> None:
        self.error, self.hold, self.calls = error, hold, []

    async def __call__(self, request: FillRequest, log: logging.LoggerAdapter) -> None:
        self.calls.append(request)
        if self.hold is not None:
            await self.hold.wait()
        if self.error:
            raise RuntimeError(self.error)
        folder = request.hub_cache / f"models--{request.model_id.replace('/', '--')}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.safetensors").write_bytes(b"weights")


def test_a_marker_names_one_model_at_one_revision(tmp_path: Path) -> None:
    marker = marker_path(tmp_path, "HuggingFaceTB/SmolLM2-135M-Instruct", None)
    assert marker == marker_path(tmp_path, "HuggingFaceTB/SmolLM2-135M-Instruct", None)
    assert marker.parent == tmp_path / ".serve-app" and marker.name.startswith("filled-")
    others = {
        marker_path(tmp_path, "HuggingFaceTB/SmolLM2-135M-Instruct", "main"),
        marker_path(tmp_path, "HuggingFaceTB/SmolLM2-360M-Instruct", None),
        # the name and revision are not simply joined: no pair stands for another
        marker_path(tmp_path, "a", "b/c"),
        marker_path(tmp_path, "a/b", "c"),
    }
    assert marker not in others and len(others) == 4
    # the same names the fill Job of earlier releases wrote: a cache it filled is used as it is
    digest = hashlib.sha256(b'["HuggingFaceTB/SmolLM2-135M-Instruct", null]').hexdigest()
    assert marker.name == "filled-" + digest[:12]


def test_what_fills_nothing_says_why(tmp_path: Path) -> None:
    local = TierConfig(name="cpu")  # the local engine, its bundled model
    simulated = TierConfig(name="sim", engine=EngineConfig(model_id="simulated"))
    on_disk = TierConfig(name="disk", engine=EngineConfig(launcher="vllm", model_id="/m/smollm2"))
    assert "local engine" in (skip_reason(local, cached(tmp_path)) or "")
    assert "local engine" in (skip_reason(simulated, cached(tmp_path)) or "")
    assert "path on disk" in (skip_reason(on_disk, cached(tmp_path)) or "")
    assert "no shared model cache" in (skip_reason(tgi_tier(), {}) or "")
    assert skip_reason(tgi_tier(), cached(tmp_path)) is None
    vllm = TierConfig(name="v", engine=EngineConfig(launcher="vllm", model_id=MODEL))
    assert skip_reason(vllm, cached(tmp_path)) is None


def test_no_fill_touches_nothing(tmp_path: Path) -> None:
    hub = Hub()
    local = TierConfig(name="cpu")
    assert asyncio.run(ensure_model_cached(local, cached(tmp_path), LOG, hub)) is None
    assert asyncio.run(ensure_model_cached(tgi_tier(), {}, LOG, hub)) is None
    assert not hub.calls and not list(tmp_path.iterdir())


def test_a_fill_downloads_once_then_finds_its_marker(tmp_path: Path) -> None:
    hub = Hub()
    marker = asyncio.run(ensure_model_cached(tgi_tier(revision="abc"), cached(tmp_path), LOG, hub))
    assert marker == marker_path(tmp_path, MODEL, "abc") and marker.exists()
    assert MODEL + "@abc filled at" in marker.read_text()
    (request,) = hub.calls
    assert (request.model_id, request.revision) == (MODEL, "abc")
    assert request.hub_cache == tmp_path / "hub"
    assert "HF_HUB_OFFLINE" not in request.environ  # the engine stays offline, the fill is not
    assert (tmp_path / "hub" / "models--org--gated-model" / "model.safetensors").exists()
    # the next replica (a restart, another tier with the same model) starts at once
    assert asyncio.run(ensure_model_cached(tgi_tier(revision="abc"), cached(tmp_path), LOG, hub))
    assert len(hub.calls) == 1
    # another revision is another model
    asyncio.run(ensure_model_cached(tgi_tier(), cached(tmp_path), LOG, hub))
    assert len(hub.calls) == 2


def test_the_token_file_is_read_at_each_fill(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("hf_first\n")
    env = cached(tmp_path, **{HF_TOKEN_PATH_ENV: str(token)})
    assert download_environ(env)["HF_TOKEN"] == "hf_first"
    token.write_text("hf_rotated\n")
    assert download_environ(env)["HF_TOKEN"] == "hf_rotated"
    assert "HF_TOKEN" not in download_environ(cached(tmp_path))  # public models need none


def test_a_failed_fill_leaves_its_reason_and_fails_the_start_with_it(tmp_path: Path) -> None:
    hub = Hub(error=f"401 Client Error: access to model {MODEL} is restricted")
    with pytest.raises(ModelFillError) as failed:
        asyncio.run(ensure_model_cached(tgi_tier(), cached(tmp_path), LOG, hub))
    marker = marker_path(tmp_path, MODEL, None)
    reason = failed_path(marker).read_text()
    assert reason.startswith(f"filling the model cache with {MODEL} failed on ")
    assert "401 Client Error" in reason and "401 Client Error" in str(failed.value)
    assert not marker.exists()
    # the next start retries; its success removes the reason
    asyncio.run(ensure_model_cached(tgi_tier(), cached(tmp_path), LOG, Hub()))
    assert marker.exists() and not failed_path(marker).exists()


def test_replicas_on_one_volume_download_once(tmp_path: Path) -> None:
    async def two_replicas() -> list[Path | None]:
        hold = asyncio.Event()
        hub = Hub(hold=hold)
        first = asyncio.create_task(ensure_model_cached(tgi_tier(), cached(tmp_path), LOG, hub))
        second = asyncio.create_task(ensure_model_cached(tgi_tier(), cached(tmp_path), LOG, hub))
        await asyncio.sleep(0.3)
        assert len(hub.calls) == 1  # the other one waits for the lock
        hold.set()
        done = await asyncio.gather(first, second)
        assert len(hub.calls) == 1
        return done

    first, second = asyncio.run(two_replicas())
    assert first == second == marker_path(tmp_path, MODEL, None)


LOCK_HOLDER = """
import fcntl, sys, time
from pathlib import Path
with open(sys.argv[1], "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(float(sys.argv[3]))
    if sys.argv[2]:
        Path(sys.argv[2]).write_text("filled by the other replica")
"""


def hold_lock(marker: Path, seconds: float, write_marker: bool) -> subprocess.Popen[str]:
    """Another replica, in a process of its own, downloading: holds the lock, then (or not)
    writes the marker."""
    marker.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(lock_path(marker)),
                               str(marker) if write_marker else "", str(seconds)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    return holder


def test_a_replica_waits_for_another_process_filling_the_same_model(tmp_path: Path) -> None:
    marker = marker_path(tmp_path, MODEL, None)
    holder = hold_lock(marker, 1.5, write_marker=True)
    hub = Hub()
    started = time.monotonic()
    assert asyncio.run(ensure_model_cached(tgi_tier(), cached(tmp_path), LOG, hub)) == marker
    assert time.monotonic() - started >= 1.0 and not hub.calls
    assert holder.wait(10) == 0


def test_a_download_killed_midway_is_resumed_by_the_next_replica(tmp_path: Path) -> None:
    """The lock dies with its holder: the next replica takes it and downloads."""
    marker = marker_path(tmp_path, MODEL, None)
    holder = hold_lock(marker, 60, write_marker=False)
    holder.kill()
    holder.wait(10)
    hub = Hub()
    assert asyncio.run(ensure_model_cached(tgi_tier(), cached(tmp_path), LOG, hub)) == marker
    assert len(hub.calls) == 1


def test_a_replica_waits_no_longer_than_its_start_up_timeout(tmp_path: Path) -> None:
    marker = marker_path(tmp_path, MODEL, None)
    holder = hold_lock(marker, 30, write_marker=False)
    try:
        with pytest.raises(ModelFillError, match="another replica still holds its lock"):
            asyncio.run(ensure_model_cached(tgi_tier(timeout_s=1.5), cached(tmp_path), LOG, Hub()))
    finally:
        holder.kill()
        holder.wait(10)


def test_weights_of_one_format_and_no_subfolders() -> None:
    llama = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
             "model-00002-of-00002.safetensors", "model.safetensors.index.json",
             "original/consolidated.00.pth", "original/params.json", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "LICENSE",
             "README.md"]  # fmt: skip
    assert weight_files(llama) == sorted(set(llama) - {"original/consolidated.00.pth",
                                                       "original/params.json"})  # fmt: skip
    both = ["config.json", "model.safetensors", "pytorch_model.bin", "flax_model.msgpack",
            "model.onnx", "tokenizer.model"]  # fmt: skip
    assert weight_files(both) == ["config.json", "model.safetensors", "tokenizer.model"]
    older = ["config.json", "pytorch_model.bin", "tf_model.h5", "vocab.txt"]
    assert weight_files(older) == ["config.json", "pytorch_model.bin", "vocab.txt"]


def test_huggingface_hub_unreachable_fails_fast_with_the_reason_recorded(tmp_path: Path) -> None:
    """The real download (huggingface_hub in a child process) against a hub that refuses
    connections: the start fails within seconds, the reason beside the marker."""
    env = cached(tmp_path, HF_ENDPOINT="http://127.0.0.1:9")
    started = time.monotonic()
    with pytest.raises(ModelFillError) as failed:
        asyncio.run(ensure_model_cached(tgi_tier(), env, LOG))
    assert time.monotonic() - started < 30
    reason = failed_path(marker_path(tmp_path, MODEL, None)).read_text()
    assert "the download exited with code 1" in reason
    assert "Connection refused" in reason and "Connection refused" in str(failed.value)
    assert not marker_path(tmp_path, MODEL, None).exists()


def test_a_download_past_its_time_is_killed_and_says_so(tmp_path: Path) -> None:
    """huggingface_hub retrying a hub that never answers (a port that accepts and stays
    silent): the child is killed at the start-up timeout, with what it said so far."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        env = cached(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{silent.getsockname()[1]}",
                     HF_HUB_ETAG_TIMEOUT="30", HF_HUB_DOWNLOAD_TIMEOUT="30")  # fmt: skip
        started = time.monotonic()
        with pytest.raises(ModelFillError, match="not downloaded within 2s"):
            asyncio.run(ensure_model_cached(tgi_tier(timeout_s=2), env, LOG))
        assert time.monotonic() - started < 10
    assert failed_path(marker_path(tmp_path, MODEL, None)).exists()


def test_download_progress_counts_each_file_once(tmp_path: Path) -> None:
    """Hugging Face's cache layout: blobs (finished, and `.incomplete` ones still coming) and
    the snapshot's symlinks to them, which are not counted again."""
    from serve_app.tier.model_fill import _bytes_under

    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "aaa").write_bytes(b"x" * 1000)
    (blobs / "bbb.incomplete").write_bytes(b"x" * 500)
    snapshot = tmp_path / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(blobs / "aaa")
    assert _bytes_under(tmp_path) == 1500
    assert _bytes_under(tmp_path / "missing") == 0


def test_the_fill_command_an_operator_runs_in_a_tier_pod(tmp_path: Path) -> None:
    """`python -m serve_app.tier.model_fill fill MODEL`: the replica's fill, from a shell."""
    import os

    command = [sys.executable, "-m", "serve_app.tier.model_fill", "fill", MODEL]
    base = {k: v for k, v in os.environ.items() if k != MODEL_CACHE_ENV}
    outside = subprocess.run(command, env=base, capture_output=True, text=True, timeout=60)
    assert outside.returncode == 2 and f"{MODEL_CACHE_ENV} is not set" in outside.stderr
    env = {**base, **cached(tmp_path, HF_ENDPOINT="http://127.0.0.1:9")}
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert "Connection refused" in failed_path(marker_path(tmp_path, MODEL, None)).read_text()
    assert f"filling the model cache with {MODEL} failed" in refused.stderr


def test_a_cache_that_cannot_be_written_fails_the_start_with_why(tmp_path: Path) -> None:
    blocked = tmp_path / "file-not-a-directory"
    blocked.write_text("")  # the marker's folder cannot be made under it
    with pytest.raises(ModelFillError, match="filling the model cache with org/gated-model failed"):
        asyncio.run(ensure_model_cached(tgi_tier(), cached(blocked), LOG, Hub()))
