"""The argv a `launcher: vllm` replica generates, read by vLLM's own argument parser and its
pre-start checks (`make_arg_parser`, `validate_parsed_serve_args`), in vLLM's environment.
Every quantization the configuration maps is one vLLM knows. Skipped without vLLM."""

from __future__ import annotations

import json
import subprocess

import pytest

from serve_app.config import EngineConfig, EngineTuning, TierConfig, TracingConfig
from serve_app.engine.launcher import Ports, build_launch
from serve_app.vllm_args import VLLM_QUANTIZATION
from tests.vllm import VLLM_MODEL, VLLM_PYTHON, needs_vllm

pytestmark = needs_vllm

# Parses each argv (without the program) as `python -m vllm.entrypoints.openai.api_server` does,
# and prints what vLLM made of the flags that matter, or the parser's complaint.
PARSE = """
import json, sys
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
from vllm.utils.argparse_utils import FlexibleArgumentParser
out = []
for argv in json.loads(sys.stdin.read()):
    parser = make_arg_parser(FlexibleArgumentParser())
    args = parser.parse_args(argv)
    validate_parsed_serve_args(args)
    out.append({k: getattr(args, k) for k in (
        "model", "served_model_name", "host", "port", "max_model_len", "tensor_parallel_size",
        "dtype", "max_num_seqs", "enforce_eager", "quantization", "revision", "shutdown_timeout",
        "otlp_traces_endpoint", "api_key")})
print(json.dumps({"parsed": out, "quantizations": QUANTIZATION_METHODS}))
"""


def tier(gpus: int, **engine: object) -> TierConfig:
    settings: dict[str, object] = {
        "launcher": "vllm",
        "model_id": str(VLLM_MODEL),
        "dtype": "bfloat16",
        "max_input_tokens": 1536,
        "max_total_tokens": 2048,
        "tuning": EngineTuning(python=str(VLLM_PYTHON), max_batch_size=8),
        **engine,
    }
    return TierConfig(name="v", engine=EngineConfig.model_validate(settings), gpus_per_replica=gpus)


def parsed_by_vllm(argvs: list[tuple[str, ...]]) -> dict[str, object]:
    programs = {argv[:3] for argv in argvs}
    assert programs == {(str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server")}
    done = subprocess.run(
        [str(VLLM_PYTHON), "-c", PARSE],
        input=json.dumps([list(argv[3:]) for argv in argvs]),
        capture_output=True, text=True, timeout=300, env={"VLLM_NO_USAGE_STATS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_vllms_parser_reads_the_generated_argv_as_meant() -> None:
    ports = Ports(8123, 9123, 29123, "/tmp/r/tgi-shard", host="10.0.0.9")
    tracing = TracingConfig(otlp_endpoint="http://collector:4317")
    cpu = build_launch(tier(0), ports, [], {}, tracing, api_key="k-1234").argv
    gpus = build_launch(tier(4, revision="main"), ports, ["0", "1", "2", "3"], {}).argv
    quantized = [
        build_launch(tier(1, quantize=name), ports, ["0"], {}).argv for name in VLLM_QUANTIZATION
    ]
    answer = parsed_by_vllm([cpu, gpus, *quantized])
    on_cpu, on_gpus, *by_quantization = answer["parsed"]  # type: ignore[misc]
    assert on_cpu == {
        "model": str(VLLM_MODEL), "served_model_name": [str(VLLM_MODEL)], "host": "10.0.0.9",
        "port": 8123, "max_model_len": 2048, "tensor_parallel_size": 1, "dtype": "bfloat16",
        "max_num_seqs": 8, "enforce_eager": True, "quantization": None, "revision": None,
        "shutdown_timeout": 30, "otlp_traces_endpoint": "http://collector:4317",
        "api_key": None,  # from VLLM_API_KEY, off the command line
    }  # fmt: skip
    assert on_gpus["tensor_parallel_size"] == 4 and on_gpus["enforce_eager"] is False
    assert on_gpus["revision"] == "main"
    assert [p["quantization"] for p in by_quantization] == list(VLLM_QUANTIZATION.values())
    assert set(VLLM_QUANTIZATION.values()) <= set(answer["quantizations"])  # type: ignore[arg-type]


@pytest.mark.parametrize("extra", [("--max-num-batched-tokens", "4096"), ("--seed", "1")])
def test_vllm_flags_in_extra_args_pass_its_parser(extra: tuple[str, ...]) -> None:
    argv = build_launch(tier(0, extra_args=extra), Ports(1, 2, 3, "/tmp/x"), [], {}).argv
    assert parsed_by_vllm([argv])["parsed"]
