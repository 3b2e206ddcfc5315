"""A `launcher: vllm` tier refuses, at deploy time, the settings vLLM has no equivalent of, and
says what to do instead."""

from __future__ import annotations

import typing

import pytest
from pydantic import ValidationError

from serve_app.config import EngineConfig, Quantize, TierConfig
from serve_app.vllm_args import NO_VLLM_QUANTIZATION, VLLM_QUANTIZATION, refusals


def vllm_engine(**settings: object) -> EngineConfig:
    return EngineConfig.model_validate({"launcher": "vllm", "model_id": "org/m", **settings})


def test_every_tgi_quantization_maps_or_is_refused() -> None:
    tgi = set(typing.get_args(Quantize))
    assert set(VLLM_QUANTIZATION) | set(NO_VLLM_QUANTIZATION) == tgi
    assert not set(VLLM_QUANTIZATION) & set(NO_VLLM_QUANTIZATION)


@pytest.mark.parametrize("quantize", sorted(VLLM_QUANTIZATION))
def test_a_mapped_quantization_is_taken(quantize: str) -> None:
    assert vllm_engine(quantize=quantize).quantize == quantize


@pytest.mark.parametrize("quantize", sorted(NO_VLLM_QUANTIZATION))
def test_an_unmapped_quantization_is_refused_by_name(quantize: str) -> None:
    with pytest.raises(ValidationError, match=f"quantize '{quantize}' has no vLLM equivalent"):
        vllm_engine(quantize=quantize)
    TierConfig(name="t", gpus_per_replica=1, engine=EngineConfig(launcher="tgi", quantize=quantize))


@pytest.mark.parametrize(
    ("flag", "instead"),
    [
        ("--max-batch-prefill-tokens", "vLLM --max-num-batched-tokens"),
        ("--num-shard", "set gpus_per_replica"),
        ("--cuda-memory-fraction=0.8", "vLLM --gpu-memory-utilization"),
        ("--max-waiting-tokens", "no equivalent"),
        ("--watermark-gamma", "vLLM has no watermarking"),
    ],
)
def test_a_tgi_flag_in_extra_args_is_refused_with_what_to_use(flag: str, instead: str) -> None:
    with pytest.raises(ValidationError) as info:
        vllm_engine(extra_args=[flag, "4"])
    message = str(info.value)
    assert "settings a 'vllm' engine cannot take (docs/vllm.md)" in message
    assert f"{flag.split('=')[0]} is text-generation-launcher's, not vLLM's" in message
    assert instead in message


@pytest.mark.parametrize("flag", ["--port", "--api-key", "--served-model-name", "--model"])
def test_a_generated_flag_in_extra_args_is_refused(flag: str) -> None:
    with pytest.raises(ValidationError, match=f"extra_args: {flag} is generated from"):
        vllm_engine(extra_args=[flag, "x"])


def test_every_reason_is_given_at_once() -> None:
    found = refusals("eetq", ["--speculate", "2", "--port", "9"])
    assert [r.split(" ", 2)[1] for r in found] == ["'eetq'", "--speculate", "--port"]


def test_vllms_own_flags_pass() -> None:
    engine = vllm_engine(extra_args=["--max-num-batched-tokens", "4096", "--enforce-eager"])
    assert engine.extra_args[-1] == "--enforce-eager"
    assert refusals(None, ["--seed", "1", "--gpu-memory-utilization=0.8"]) == []


def test_a_tgi_tier_keeps_its_own_flags() -> None:
    tier = TierConfig(
        name="t",
        gpus_per_replica=1,
        engine=EngineConfig(launcher="tgi", extra_args=("--max-batch-prefill-tokens", "4096")),
    )
    assert tier.engine.extra_args[0] == "--max-batch-prefill-tokens"


@pytest.mark.parametrize("setting", [{"python": "/v/bin/python"}, {"cpu_kv_cache_gib": 2}])
def test_vllms_own_settings_are_refused_on_other_engines(setting: dict[str, object]) -> None:
    (name,) = setting
    with pytest.raises(ValidationError, match=f"tuning.{name} applies to 'vllm' engines only"):
        EngineConfig.model_validate({"launcher": "local", "tuning": setting})
    assert vllm_engine(tuning=setting).tuning.model_dump()[name] == setting[name]
