"""TGI's launcher settings in vLLM's terms: what maps, and what a `launcher: vllm` tier refuses.

Pure data and one check, read by the configuration (`EngineConfig`, at deploy time) and the
launcher (`serve_app.engine.launcher.build_vllm_launch`). docs/vllm.md is the table for people.
"""

from __future__ import annotations

from collections.abc import Sequence

# TGI's `--quantize` as vLLM's `--quantization`. vLLM picks its Marlin kernels for GPTQ and AWQ
# checkpoints itself; TGI's `marlin` is a GPTQ checkpoint in Marlin's layout.
VLLM_QUANTIZATION = {
    "awq": "awq",
    "gptq": "gptq",
    "marlin": "gptq_marlin",
    "fp8": "fp8",
    "compressed-tensors": "compressed-tensors",
}
# TGI's `--quantize` values vLLM has no equivalent of, and what to do instead.
NO_VLLM_QUANTIZATION = {
    "eetq": "vLLM has no EETQ kernels; use 'fp8' or a pre-quantized AWQ/GPTQ checkpoint",
    "exl2": "vLLM does not load EXL2 checkpoints; use a GPTQ or AWQ one",
    "bitsandbytes": "vLLM 0.32 has no bitsandbytes; use 'fp8' or a pre-quantized checkpoint",
    "bitsandbytes-nf4": "vLLM 0.32 has no bitsandbytes; use 'fp8' or a pre-quantized checkpoint",
    "bitsandbytes-fp4": "vLLM 0.32 has no bitsandbytes; use 'fp8' or a pre-quantized checkpoint",
}
# Flags the launcher always makes from the tier's settings: never in `extra_args`. (Those it
# makes only from a setting that is set, `--dtype` or `--max-num-seqs`, may be given there
# instead, and then win: `extra_args` come last.)
GENERATED = {
    "--model": "engine.model_id",
    "--served-model-name": "engine.model_id (the name the router sends)",
    "--host": "the replica (the node's address or loopback)",
    "--port": "the replica (a free port)",
    "--api-key": "the replica (a fresh key per engine, in VLLM_API_KEY)",
    "--max-model-len": "engine.max_total_tokens",
    "--tensor-parallel-size": "gpus_per_replica",
    "--shutdown-timeout": "engine.tuning.graceful_termination_timeout_s",
}
# `text-generation-launcher` flags a TGI tier may have carried in `extra_args`: what vLLM has
# instead, or why it has nothing.
TGI_ONLY_FLAGS = {
    "--model-id": "set engine.model_id",
    "--hostname": "the replica sets --host",
    "--num-shard": "set gpus_per_replica (vLLM --tensor-parallel-size)",
    "--sharded": "set gpus_per_replica (vLLM --tensor-parallel-size)",
    "--max-input-tokens": "set engine.max_input_tokens (vLLM has no prompt limit of its own)",
    "--max-input-length": "set engine.max_input_tokens (vLLM has no prompt limit of its own)",
    "--max-total-tokens": "set engine.max_total_tokens (vLLM --max-model-len)",
    "--max-batch-size": "set engine.tuning.max_batch_size (vLLM --max-num-seqs)",
    "--max-batch-prefill-tokens": "vLLM --max-num-batched-tokens",
    "--max-batch-total-tokens": "vLLM sizes its KV cache with --gpu-memory-utilization "
    "(on CPU: engine.tuning.cpu_kv_cache_gib)",
    "--max-concurrent-requests": "vLLM queues every request; the tier's "
    "tuning.max_ongoing_requests bounds a replica",
    "--max-waiting-tokens": "vLLM schedules every step; no equivalent",
    "--waiting-served-ratio": "vLLM schedules every step; no equivalent",
    "--max-best-of": "vLLM has no best_of; no equivalent",
    "--max-stop-sequences": "the router bounds stop sequences",
    "--max-top-n-tokens": "vLLM --max-logprobs",
    "--max-client-batch-size": "no equivalent",
    "--cuda-graphs": "vLLM --enforce-eager (off) or --compilation-config",
    "--cuda-memory-fraction": "vLLM --gpu-memory-utilization",
    "--rope-scaling": "vLLM --hf-overrides",
    "--rope-factor": "vLLM --hf-overrides",
    "--speculate": "vLLM --speculative-config",
    "--watermark-gamma": "vLLM has no watermarking",
    "--watermark-delta": "vLLM has no watermarking",
    "--lora-adapters": "vLLM --enable-lora with --lora-modules",
    "--tokenizer-config-path": "vLLM --tokenizer",
    "--disable-grammar-support": "vLLM --structured-outputs-config",
    "--payload-limit": "the router's tuning.max_body_bytes",
    "--graceful-termination-timeout": "set engine.tuning.graceful_termination_timeout_s "
    "(vLLM --shutdown-timeout)",
    "--shard-uds-path": "vLLM has no shard sockets",
    "--master-addr": "vLLM's distributed settings",
    "--master-port": "vLLM's distributed settings",
    "--prometheus-port": "vLLM serves /metrics on its own port",
    "--json-output": "no equivalent",
    "--otlp-endpoint": "set tracing (vLLM --otlp-traces-endpoint)",
    "--otlp-service-name": "set tracing (OTEL_SERVICE_NAME)",
    "--usage-stats": "the replica sets VLLM_NO_USAGE_STATS",
    "--env": "no equivalent",
}


def refusals(quantize: str | None, extra_args: Sequence[str]) -> list[str]:
    """Why a tier's engine settings cannot run on vLLM, one sentence each (none: they can)."""
    found = []
    if quantize in NO_VLLM_QUANTIZATION:
        found.append(
            f"quantize {quantize!r} has no vLLM equivalent: {NO_VLLM_QUANTIZATION[quantize]}"
        )
    for arg in extra_args:
        name = arg.split("=", 1)[0]
        if name in GENERATED:
            found.append(f"extra_args: {name} is generated from {GENERATED[name]}")
        elif name in TGI_ONLY_FLAGS:
            instead = TGI_ONLY_FLAGS[name]
            found.append(f"extra_args: {name} is text-generation-launcher's, not vLLM's: {instead}")
    return found
