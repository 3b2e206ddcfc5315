"""`text-generation-launcher`'s command line, as far as a CPU engine can honour it."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

log = logging.getLogger("local_engine")

# Flags that only mean something to TGI on GPUs. They are accepted, so that the supervisor can
# give one argv to either launcher, and logged as not applicable.
GPU_ONLY_FLAGS = (
    "--num-shard",
    "--quantize",
    "--dtype",
    "--revision",
    "--cuda-memory-fraction",
    "--sharded",
    "--shard-uds-path",
    "--master-addr",
    "--master-port",
    "--prometheus-port",
    "--usage-stats",
    "--max-batch-prefill-tokens",
    "--max-batch-total-tokens",
    "--max-waiting-tokens",
    "--waiting-served-ratio",
    "--huggingface-hub-cache",
    "--trust-remote-code",
    "--disable-custom-kernels",
    "--cuda-graphs",
)
GPU_ONLY_SWITCHES = ("--sharded", "--trust-remote-code", "--disable-custom-kernels")


@dataclass(frozen=True)
class EngineArgs:
    model_id: str
    hostname: str
    port: int
    max_input_tokens: int
    max_total_tokens: int
    max_concurrent_requests: int
    max_batch_size: int
    max_stop_sequences: int
    max_best_of: int
    max_top_n_tokens: int
    max_client_batch_size: int
    payload_limit: int
    api_key: str | None
    json_output: bool
    graceful_termination_timeout: int
    threads: int | None
    sim_ttft_ms: float
    sim_itl_ms: float
    sim_output_tokens: int
    sim_prefill_us_per_token: float
    sim_prefix_cache_tokens: int
    compute_type: str  # TGI's `x-compute-type` header, from the COMPUTE_TYPE variable as in TGI
    otlp_endpoint: str | None = None
    otlp_service_name: str = "text-generation-inference.router"
    sim_failure_rate: float = 0.0
    sim_load_s: float = 0.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serve_app.local_engine",
        description="TGI-protocol server on CPU; takes text-generation-launcher's flags.",
    )
    p.add_argument("--model-id", default="smollm2-135m-instruct")
    p.add_argument("--hostname", default="127.0.0.1")
    p.add_argument("-p", "--port", type=int, default=3000)
    p.add_argument("--max-input-tokens", "--max-input-length", type=int, default=1024)
    p.add_argument("--max-total-tokens", type=int, default=2048)
    p.add_argument("--max-concurrent-requests", type=int, default=128)
    p.add_argument("--max-batch-size", type=int, default=4)
    p.add_argument("--max-stop-sequences", type=int, default=4)
    p.add_argument("--max-best-of", type=int, default=2)
    p.add_argument("--max-top-n-tokens", type=int, default=5)
    p.add_argument("--max-client-batch-size", type=int, default=4)
    p.add_argument("--payload-limit", type=int, default=2_000_000)
    # As TGI's launcher: the flag, else the `API_KEY` variable.
    p.add_argument("--api-key", default=os.environ.get("API_KEY") or None)
    p.add_argument("--json-output", action="store_true")
    p.add_argument("--graceful-termination-timeout", type=int, default=90)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for llama.cpp")
    p.add_argument("--otlp-endpoint", default=None, help="OTLP/gRPC endpoint for spans")
    p.add_argument("--otlp-service-name", default="text-generation-inference.router")
    sim = p.add_argument_group("simulation (with --model-id simulated)")
    sim.add_argument("--sim-ttft-ms", type=float, default=20.0)
    sim.add_argument("--sim-itl-ms", type=float, default=10.0)
    sim.add_argument("--sim-output-tokens", type=int, default=64)
    sim.add_argument("--sim-prefill-us-per-token", type=float, default=0.0,
                     help="prefill time per uncached prompt token (0: none)")  # fmt: skip
    sim.add_argument("--sim-prefix-cache-tokens", type=int, default=0,
                     help="prefix cache size in tokens (0: no cache)")  # fmt: skip
    sim.add_argument("--sim-failure-rate", type=float, default=0.0,
                     help="share of generations that fail with a 500")  # fmt: skip
    sim.add_argument("--sim-load-s", type=float, default=0.0,
                     help="seconds the model takes to load before the port opens (a cold "
                     "start)")  # fmt: skip
    for flag in GPU_ONLY_FLAGS:
        if flag in GPU_ONLY_SWITCHES:
            p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
        else:
            p.add_argument(flag, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None) -> tuple[EngineArgs, list[str]]:
    """Parse argv; returns the engine's arguments and the GPU-only flags that were given."""
    ns = _parser().parse_args(argv)
    if ns.max_input_tokens >= ns.max_total_tokens:
        _parser().error("--max-input-tokens must be less than --max-total-tokens")
    if ns.max_batch_size < 1 or ns.max_concurrent_requests < 1:
        _parser().error("--max-batch-size and --max-concurrent-requests must be at least 1")
    ignored = [
        flag
        for flag in GPU_ONLY_FLAGS
        if getattr(ns, flag[2:].replace("-", "_")) not in (None, False)
    ]
    args = EngineArgs(
        **{name: getattr(ns, name) for name in EngineArgs.__dataclass_fields__ if name in ns},
        compute_type=os.environ.get("COMPUTE_TYPE", "cpu+llama.cpp"),
    )
    return args, ignored
