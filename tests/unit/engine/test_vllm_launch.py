"""What a `launcher: vllm` replica runs: vLLM's OpenAI server with the tier's settings."""

from __future__ import annotations

import pytest

from serve_app.config import EngineConfig, EngineTuning, TierConfig, TracingConfig
from serve_app.engine.launcher import Ports, build_launch

PORTS = Ports(http=8123, prometheus=9123, master=29123, shard_uds_path="/tmp/r/tgi-shard")
VENV_PYTHON = "/srv/app/.vllm/venv/bin/python"


def vllm_tier(gpus: int = 0, **engine: object) -> TierConfig:
    settings: dict[str, object] = {
        "launcher": "vllm",
        "model_id": "/models/smollm2-135m-instruct",
        "dtype": "bfloat16",
        "max_input_tokens": 1536,
        "max_total_tokens": 2048,
        "tuning": EngineTuning(python=VENV_PYTHON, max_batch_size=8, cpu_kv_cache_gib=2),
        **engine,
    }
    return TierConfig(
        name="vllm-small",
        engine=EngineConfig.model_validate(settings),
        gpus_per_replica=gpus,
        max_tokens_limit=512,
    )


def flag(argv: tuple[str, ...], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_cpu_argv_from_the_tiers_settings() -> None:
    spec = build_launch(vllm_tier(), PORTS, [], {"PATH": "/usr/bin"}, api_key="k-secret-1")
    argv = spec.argv
    assert argv[:3] == (VENV_PYTHON, "-m", "vllm.entrypoints.openai.api_server")
    assert flag(argv, "--model") == "/models/smollm2-135m-instruct"
    # the router sends the tier's model_id as `model`: vLLM serves under exactly that name
    assert flag(argv, "--served-model-name") == "/models/smollm2-135m-instruct"
    assert (flag(argv, "--host"), flag(argv, "--port")) == ("127.0.0.1", "8123")
    assert flag(argv, "--max-model-len") == "2048"
    assert flag(argv, "--dtype") == "bfloat16"
    assert flag(argv, "--max-num-seqs") == "8"
    assert flag(argv, "--tensor-parallel-size") == "1"
    assert "--enforce-eager" in argv
    assert flag(argv, "--shutdown-timeout") == "30"  # in-flight requests drain after SIGTERM
    # TGI's own flags never reach vLLM
    assert not {"--model-id", "--hostname", "--max-input-tokens", "--json-output"} & set(argv)


def test_cpu_environment() -> None:
    environ = {"PATH": "/usr/bin", "PYTHONPATH": "/ray/site", "VIRTUAL_ENV": "/srv/.venv"}
    env = build_launch(vllm_tier(), PORTS, [], environ, api_key="k-secret-1").env
    assert env["VLLM_HOST_IP"] == "127.0.0.1"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert env["HF_HUB_OFFLINE"] == "1"  # weights on disk
    assert env["VLLM_NO_USAGE_STATS"] == "1"
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    assert env["PATH"] == "/usr/bin"
    # vLLM's environment is its own: not the replica's packages
    assert "PYTHONPATH" not in env and "VIRTUAL_ENV" not in env


def test_the_key_stays_off_the_command_line() -> None:
    spec = build_launch(vllm_tier(), PORTS, [], {}, api_key="k-secret-1")
    assert spec.env["VLLM_API_KEY"] == "k-secret-1"
    assert "k-secret-1" not in spec.argv
    assert "k-secret-1" in spec.secrets  # masked in its log lines
    assert "VLLM_API_KEY" not in build_launch(vllm_tier(), PORTS, [], {}).env


@pytest.mark.parametrize("gpus", [1, 2, 4])
def test_gpu_argv_follows_assigned_gpus(gpus: int) -> None:
    ids = [str(i + 2) for i in range(gpus)]
    tier = vllm_tier(gpus, model_id="meta-llama/Llama-3.1-8B-Instruct", quantize="awq")
    spec = build_launch(tier, PORTS, ids, {})
    assert flag(spec.argv, "--tensor-parallel-size") == str(gpus)
    assert spec.env["CUDA_VISIBLE_DEVICES"] == ",".join(ids)
    assert flag(spec.argv, "--quantization") == "awq"
    assert "--enforce-eager" not in spec.argv  # CUDA graphs on a GPU
    assert "VLLM_CPU_KVCACHE_SPACE" not in spec.env
    assert "HF_HUB_OFFLINE" not in spec.env  # a hub model id: the replica's own choice


def test_the_hub_offline_choice_of_the_replica_passes_through() -> None:
    tier = vllm_tier(1, model_id="org/model")
    assert build_launch(tier, PORTS, ["0"], {"HF_HUB_OFFLINE": "1"}).env["HF_HUB_OFFLINE"] == "1"


def test_a_direct_path_engine_listens_and_queues_on_the_nodes_address() -> None:
    node = Ports(8000, 9000, 29500, "/tmp/r/tgi-shard", host="10.0.3.7")
    spec = build_launch(vllm_tier(), node, [], {})
    assert flag(spec.argv, "--host") == "10.0.3.7"
    assert spec.env["VLLM_HOST_IP"] == "10.0.3.7"


def test_revision_tracing_and_extra_args_last() -> None:
    tracing = TracingConfig(otlp_endpoint="http://collector:4317", service_name="llm")
    tier = vllm_tier(revision="v2", extra_args=("--seed", "3"))
    spec = build_launch(tier, PORTS, [], {}, tracing)
    assert flag(spec.argv, "--revision") == "v2"
    assert flag(spec.argv, "--otlp-traces-endpoint") == "http://collector:4317"
    assert spec.env["OTEL_SERVICE_NAME"] == "llm-engine"
    assert spec.argv[-2:] == ("--seed", "3")


def test_unset_settings_are_vllms_own_defaults() -> None:
    tier = vllm_tier(dtype=None, tuning=EngineTuning())
    argv = build_launch(tier, PORTS, [], {}).argv
    assert argv[0] == "python"  # an image's own Python, on the replica's PATH
    assert "--dtype" not in argv and "--max-num-seqs" not in argv
    assert build_launch(tier, PORTS, [], {}).env["VLLM_CPU_KVCACHE_SPACE"] == "4"
