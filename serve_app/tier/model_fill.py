"""The model-cache fill: a tier replica makes sure its model is in the shared model cache before
its engine starts, so that the RayCluster's pods never name a model and a model change is a Serve
config change only (docs/kubernetes.md#what-changes-the-raycluster).

The shared cache is the volume every tier pod mounts read-write where `SERVE_APP_MODEL_CACHE`
names it (the `gpu` overlay: `/models`, Hugging Face's cache layout under `hub/`). Per model and
revision:

- a marker `.serve-app/filled-<digest>`: written once the weights are complete; a replica that
  finds it starts its engine at once, without a lock or a look at the hub;
- a lock `.serve-app/filled-<digest>.lock` (`fcntl.flock`): the replica that holds it downloads,
  every other replica of any tier on the same volume waits for it and then finds the marker.
  The kernel releases it when its holder dies, so a killed download is resumed by the next one;
- on failure, the reason `.serve-app/filled-<digest>.failed` beside the marker (removed by the
  next success), and the replica's start fails with the same reason: Serve's status, the
  replica's log and the pod's log show it, and Serve starts the replica again with back-off.

The download runs `python -m serve_app.tier.model_fill download` in a child process: online
(without the pod's `HF_HUB_OFFLINE`, which the engine keeps), with the Hugging Face token read
from its file at each fill, bounded by the tier's start-up timeout and killed with the replica.

No fill (`skip_reason`): the local engine (its models are installed with the project, `simulated`
is none), a model given as a path on disk, and a replica without a shared cache, whose engine
fills its own Hugging Face cache as it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from ..config import TierConfig
from ..engine.launcher import PASSTHROUGH_ENV, is_local_path, with_hf_token
from ..errors import EngineStartupError

# Set on tier pods that mount the shared model cache: where it is mounted.
MODEL_CACHE_ENV = "SERVE_APP_MODEL_CACHE"
# Lines of a failed download's output kept in its reason.
FAILURE_LINES = 20
LOCK_POLL_S = 1.0
# How often a replica waiting for another's download, or downloading, says so.
WAITING_LOG_S = 60.0
# The longest line of the download's output kept whole.
LINE_LIMIT = 1 << 20
# Weight files of every format: of a repository's top-level files, one format is fetched.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".onnx",
                   ".gguf", ".ot", ".tflite")  # fmt: skip
# In order of preference: what TGI and vLLM load.
PREFERRED_WEIGHTS = (".safetensors", ".bin", ".pt")


class ModelFillError(EngineStartupError):
    """The model could not be put into the shared cache: the replica does not start."""


@dataclass(frozen=True)
class FillRequest:
    """One model to put into the cache: `hub_cache` is Hugging Face's cache directory there,
    `environ` the download's environment (the token in it, when there is one)."""

    model_id: str
    revision: str | None
    hub_cache: Path
    environ: Mapping[str, str]
    timeout_s: float


# Downloads a model into `request.hub_cache`, or raises `ModelFillError` with the reason.
Download = Callable[[FillRequest, logging.LoggerAdapter], Awaitable[None]]


def marker_path(cache: Path, model_id: str, revision: str | None) -> Path:
    """The file written once a model's weights are in the cache, named after the model and the
    revision: the name and revision are not simply joined, so that no pair stands for another."""
    digest = hashlib.sha256(json.dumps([model_id, revision]).encode()).hexdigest()[:12]
    return cache / ".serve-app" / f"filled-{digest}"


def failed_path(marker: Path) -> Path:
    """Why the last fill of the marker's model failed."""
    return marker.with_name(marker.name + ".failed")


def lock_path(marker: Path) -> Path:
    return marker.with_name(marker.name + ".lock")


def skip_reason(tier: TierConfig, environ: Mapping[str, str]) -> str | None:
    """Why this tier's replica fills nothing, or None when it fills the shared cache."""
    engine = tier.engine
    if engine.launcher == "local":
        return "the local engine's models come with the project (or are simulated)"
    if is_local_path(engine.model_id):
        return f"the model is a path on disk ({engine.model_id})"
    if not environ.get(MODEL_CACHE_ENV):
        return "no shared model cache: the engine fills its own Hugging Face cache"
    return None


def hub_cache(environ: Mapping[str, str], cache: Path) -> Path:
    """Hugging Face's cache directory inside the shared cache, as the engine reads it."""
    return Path(environ.get("HUGGINGFACE_HUB_CACHE") or cache / "hub")


def download_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The download's environment: the engine's pass-through variables, online, with the token
    read from its file now (a rotated Secret is used by the next fill)."""
    env = {k: v for k, v in with_hf_token(environ).items() if k in PASSTHROUGH_ENV}
    env.pop("HF_HUB_OFFLINE", None)
    for name in ("HF_ENDPOINT", "HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT", "NO_PROXY",
                 "HTTPS_PROXY", "HTTP_PROXY", "no_proxy", "https_proxy", "http_proxy"):  # fmt: skip
        if name in environ:
            env[name] = environ[name]
    env["PYTHONUNBUFFERED"] = "1"
    # No progress bars: a pipe would get them as one endless line. The replica says how far
    # the download is instead (`hub_download`).
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    return env


async def ensure_model_cached(
    tier: TierConfig,
    environ: Mapping[str, str],
    log: logging.LoggerAdapter,
    download: Download | None = None,
) -> Path | None:
    """Make sure the tier's model is in the shared model cache; its marker, or None when this
    replica fills nothing (`skip_reason`). Raises `ModelFillError` with the reason when the
    model cannot be had within the tier's `engine.tuning.startup_timeout_s`."""
    skipped = skip_reason(tier, environ)
    if skipped is not None:
        log.debug("model cache: no fill (%s)", skipped)
        return None
    cache = Path(environ[MODEL_CACHE_ENV])
    engine = tier.engine
    request = FillRequest(engine.model_id, engine.revision, hub_cache(environ, cache),
                          download_environ(environ), engine.tuning.startup_timeout_s)  # fmt: skip
    return await fill(cache, request, log, download or hub_download)


async def fill(
    cache: Path, request: FillRequest, log: logging.LoggerAdapter, download: Download
) -> Path:
    """The marker of `request`'s model, once it is there: found, or downloaded under the lock.
    Every failure is a `ModelFillError` with its reason, also in the replica's (and pod's) log."""
    try:
        return await _fill(cache, request, log, download)
    except ModelFillError as exc:
        log.error("%s", exc)
        raise
    except OSError as exc:  # the cache itself: not mounted, not writable, full
        reason = f"filling the model cache with {_name(request)} failed: {exc}"
        log.error("%s", reason)
        raise ModelFillError(reason) from exc


async def _fill(
    cache: Path, request: FillRequest, log: logging.LoggerAdapter, download: Download
) -> Path:
    marker = marker_path(cache, request.model_id, request.revision)
    name = _name(request)
    if marker.exists():
        log.info("model cache: %s is there", name)
        return marker
    marker.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + request.timeout_s
    async with _locked(lock_path(marker), deadline, name, log):
        if marker.exists():  # another replica filled it while this one waited
            log.info("model cache: %s was filled by another replica", name)
            return marker
        failed = failed_path(marker)
        failed.unlink(missing_ok=True)
        log.info("model cache: downloading %s into %s", name, request.hub_cache)
        started = time.monotonic()
        left = max(1.0, deadline - started)
        try:
            await download(replace(request, timeout_s=left), log)
        except Exception as exc:
            reason = (f"filling the model cache with {name} failed on {socket.gethostname()} at "
                      f"{_now()}: {exc}")  # fmt: skip
            with contextlib.suppress(OSError):  # a full volume: the reason still goes up
                _write(failed, reason + "\n")
            raise ModelFillError(reason) from exc
        _write(marker, f"{name} filled at {_now()} in {time.monotonic() - started:.0f}s\n")
        log.info("model cache: %s filled in %.0fs", name, time.monotonic() - started)
        return marker


@contextlib.asynccontextmanager
async def _locked(
    path: Path, deadline: float, name: str, log: logging.LoggerAdapter
) -> AsyncIterator[None]:
    """Hold the fill's lock: wait (without blocking the replica's event loop) while another
    replica holds it, until `deadline`. Closing the file releases it, as does the holder's
    death."""
    with path.open("a") as handle:
        said = 0.0
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.monotonic()
                if now >= deadline:
                    raise ModelFillError(
                        f"filling the model cache with {name}: another replica still holds "
                        f"its lock ({path}) after this one waited "
                        "engine.tuning.startup_timeout_s"
                    ) from None
                if now - said >= WAITING_LOG_S:
                    log.info("model cache: waiting for another replica downloading %s", name)
                    said = now
                await asyncio.sleep(LOCK_POLL_S)
        yield


def _write(path: Path, text: str) -> None:
    """Whole or not at all: a reader never sees half a marker."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    partial.replace(path)


def _name(request: FillRequest) -> str:
    return request.model_id + (f"@{request.revision}" if request.revision else "")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the download: Hugging Face's hub, in a child process ----------------------------------------


def weight_files(files: Sequence[str]) -> list[str]:
    """What to fetch of a repository's files: every top-level file but weights, and the weights
    of one format, safetensors first (what TGI and vLLM load). Subfolders (a model's original
    checkpoint, ONNX or GGUF exports) are left out: they can double the download."""
    top = [f for f in files if "/" not in f]
    weights = {s: [f for f in top if f.endswith(s)] for s in PREFERRED_WEIGHTS}
    chosen = next((weights[s] for s in PREFERRED_WEIGHTS if weights[s]), [])
    return sorted([f for f in top if not f.endswith(WEIGHT_SUFFIXES)] + chosen)


async def hub_download(request: FillRequest, log: logging.LoggerAdapter) -> None:
    """`python -m serve_app.tier.model_fill download`, its output in the replica's log; killed
    past `request.timeout_s` or when the replica's start is cancelled."""
    argv = [sys.executable, "-m", "serve_app.tier.model_fill", "download", request.model_id,
            "--cache-dir", str(request.hub_cache)]  # fmt: skip
    if request.revision:
        argv += ["--revision", request.revision]
    child = await asyncio.create_subprocess_exec(
        *argv, env=dict(request.environ), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, limit=LINE_LIMIT,
    )  # fmt: skip
    tail: deque[str] = deque(maxlen=FAILURE_LINES)

    async def relay() -> None:
        assert child.stdout is not None
        async for raw in child.stdout:
            line = raw.decode(errors="replace").rstrip()
            tail.append(line)
            log.info("model cache: %s", line)

    async def progress() -> None:
        folder = request.hub_cache / ("models--" + request.model_id.replace("/", "--"))
        while True:
            await asyncio.sleep(WAITING_LOG_S)
            size = await asyncio.to_thread(_bytes_under, folder)
            log.info("model cache: downloading %s, %.1f GiB so far", request.model_id,
                     size / 2**30)  # fmt: skip

    ticker = asyncio.create_task(progress())
    try:
        await asyncio.wait_for(asyncio.gather(relay(), child.wait()), request.timeout_s)
    except TimeoutError:
        raise ModelFillError(
            f"not downloaded within {request.timeout_s:.0f}s (engine.tuning.startup_timeout_s)"
            + _last(tail)
        ) from None
    finally:
        ticker.cancel()
        if child.returncode is None:
            child.kill()
            await child.wait()
    if child.returncode != 0:
        raise ModelFillError(f"the download exited with code {child.returncode}" + _last(tail))


def _bytes_under(folder: Path) -> int:
    """What a download has written so far (its finished blobs and those still coming)."""
    total = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
    return total


def _last(tail: deque[str]) -> str:
    return ". Its last output:\n" + "\n".join(tail) if tail else ""


def download(model_id: str, revision: str | None, cache_dir: str) -> None:
    """Fetch `weight_files` of the model into `cache_dir` (resuming what a killed download
    left) with huggingface_hub, which reads the token from `HF_TOKEN`."""
    from huggingface_hub import HfApi, snapshot_download

    info = HfApi().model_info(model_id, revision=revision)
    files = [s.rfilename for s in info.siblings or []]
    wanted = weight_files(files)
    print(f"fetching {len(wanted)} of {len(files)} files of {model_id}", flush=True)
    path = snapshot_download(model_id, revision=revision, cache_dir=cache_dir,
                             allow_patterns=wanted)  # fmt: skip
    print(f"{model_id} is in {path}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """`download MODEL [--revision R] --cache-dir DIR`: the replica's child process. `fill
    MODEL [--revision R]`: what a replica does, from a tier pod's shell (`kubectl exec`), to
    fill the cache ahead of a model change."""
    parser = argparse.ArgumentParser(prog="python -m serve_app.tier.model_fill")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("download", "fill"):
        cmd = commands.add_parser(name)
        cmd.add_argument("model_id")
        cmd.add_argument("--revision")
        if name == "download":
            cmd.add_argument("--cache-dir", required=True)
        else:
            cmd.add_argument("--timeout-s", type=float, default=3600.0)
    args = parser.parse_args(argv)
    if args.command == "download":
        try:
            download(args.model_id, args.revision, args.cache_dir)
        except Exception as exc:  # the reason, not a traceback, is what the replica shows
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            return 1
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cache = os.environ.get(MODEL_CACHE_ENV)
    if not cache:
        print(f"{MODEL_CACHE_ENV} is not set: no shared model cache here", file=sys.stderr)
        return 2
    request = FillRequest(args.model_id, args.revision, hub_cache(os.environ, Path(cache)),
                          download_environ(os.environ), args.timeout_s)  # fmt: skip
    log = logging.LoggerAdapter(logging.getLogger("model_fill"), {})
    try:
        marker = asyncio.run(fill(Path(cache), request, log, hub_download))
    except ModelFillError:
        return 1
    print(marker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
