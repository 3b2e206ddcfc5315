"""TGI's clients, unchanged, against a real vLLM tier through the stack: the router's TGI routes
translated to vLLM's completions API (`serve_app.engine.tgi_over_openai`).

A real Ray head serves a local-engine tier and a `launcher: vllm` tier (vLLM's CPU build and the
SmolLM2 weights that `make install-vllm` puts in .vllm/). TGI's `text-generation` client,
`huggingface_hub.InferenceClient` and curl talk to the router with `X-Tier` naming the vLLM tier.
Skipped when vLLM is not installed.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from huggingface_hub import InferenceClient
from text_generation import Client
from text_generation.errors import ValidationError
from text_generation.types import Grammar, GrammarType

from tests.vllm import VLLM_MODEL, VLLM_PYTHON, needs_vllm

from .conftest import Stack, local_config

pytestmark = needs_vllm
TIER = "vllm-small"
HEADERS = {"X-Tier": TIER}
PROMPT = "What is the capital of France? The capital of France is"


def config() -> dict[str, Any]:
    """configs/local.yaml's small tier beside one vLLM tier."""
    serve = local_config()
    args = serve["applications"][0]["args"]
    small = {**args["tiers"][0], "replicas": {"min": 1, "max": 1}}
    small.pop("overflow_tier")
    small.pop("scaling")
    small.pop("tuning")
    vllm = {
        "name": TIER,
        "engine": {
            "launcher": "vllm",
            "model_id": str(VLLM_MODEL),
            "dtype": "bfloat16",
            "max_input_tokens": 1536,
            "max_total_tokens": 2048,
            "extra_args": ["--enforce-eager"],
            "tuning": {"python": str(VLLM_PYTHON), "cpu_kv_cache_gib": 1, "max_batch_size": 8,
                       "max_concurrent_requests": 16, "startup_timeout_s": 300},
        },
        "default_max_tokens": 32,
        "max_tokens_limit": 512,
    }  # fmt: skip
    args["router"] = {"default_tier": "small"}
    args["tiers"] = [small, vllm]
    return serve


@pytest.fixture(scope="module")
def stack(ray_head: Stack) -> Iterator[Stack]:
    ray_head.deploy(config())
    yield ray_head


def client(stack: Stack) -> Client:
    return Client(stack.url, headers=HEADERS, timeout=120)


# -- TGI's own client ------------------------------------------------------------------------


def test_text_generation_client_generate_with_details(stack: Stack) -> None:
    answer = client(stack).generate(PROMPT, max_new_tokens=8, decoder_input_details=True)
    assert "Paris" in answer.generated_text
    details = answer.details
    assert details.finish_reason.value in ("eos_token", "length")
    assert details.generated_tokens == len(details.tokens) >= 1
    assert "".join(t.text for t in details.tokens if not t.special) == answer.generated_text
    assert len(details.prefill) == 12 and details.prefill[0].logprob is None  # the prompt's
    assert all(t.logprob is not None for t in details.tokens)


def test_text_generation_client_generate_stream(stack: Stack) -> None:
    events = list(client(stack).generate_stream(PROMPT, max_new_tokens=8))
    assert [e.details is None for e in events] == [True] * (len(events) - 1) + [False]
    last = events[-1]
    assert last.generated_text == "".join(e.token.text for e in events if not e.token.special)
    assert "Paris" in last.generated_text
    assert last.details.generated_tokens == len(events)


def test_stop_sequences_and_a_regex_grammar(stack: Stack) -> None:
    stopped = client(stack).generate(PROMPT, max_new_tokens=16, stop_sequences=[" Paris"])
    assert stopped.generated_text == " Paris"  # TGI keeps the stop sequence
    assert stopped.details.finish_reason.value == "stop_sequence"
    digits = client(stack).generate(
        "My favourite number is",
        max_new_tokens=8,
        grammar=Grammar(type=GrammarType.Regex, value="[0-9]{3}"),
    )
    assert re.fullmatch("[0-9]{3}", digits.generated_text)


def test_seeded_sampling_repeats(stack: Stack) -> None:
    first, second = (
        client(stack).generate(PROMPT, max_new_tokens=8, do_sample=True, temperature=0.9, seed=7)
        for _ in range(2)
    )
    assert first.generated_text == second.generated_text
    assert first.details.seed == 7


def test_what_vllm_cannot_do_is_tgis_validation_error(stack: Stack) -> None:
    for asked in ({"typical_p": 0.5}, {"watermark": True}, {"top_n_tokens": 2}):
        with pytest.raises(ValidationError, match=next(iter(asked))):
            client(stack).generate(PROMPT, max_new_tokens=4, **asked)


# -- huggingface_hub -------------------------------------------------------------------------


def test_inference_client_text_generation_whole_streamed_and_detailed(stack: Stack) -> None:
    hub = InferenceClient(base_url=stack.url, headers=HEADERS, timeout=120)
    text = hub.text_generation(PROMPT, max_new_tokens=8)
    assert isinstance(text, str) and "Paris" in text
    pieces = list(hub.text_generation(PROMPT, max_new_tokens=8, stream=True))
    # greedy: the same answer; the stream's tokens end with the end-of-sequence one, as TGI's do
    assert "".join(pieces) in (text, text + "<|im_end|>")
    detailed = hub.text_generation(PROMPT, max_new_tokens=8, details=True)
    assert detailed.generated_text == text
    assert detailed.details is not None and detailed.details.generated_tokens >= 1


# -- /info, and curl for TGI's error shape ---------------------------------------------------


def test_info_is_tgis_made_of_the_tiers_settings(stack: Stack) -> None:
    answer = httpx.get(f"{stack.url}/info", headers=HEADERS, timeout=30)
    assert answer.status_code == 200 and answer.headers["x-tier"] == TIER
    info = answer.json()
    assert info["model_id"] == str(VLLM_MODEL)
    assert (info["max_input_tokens"], info["max_total_tokens"]) == (1536, 2048)


def test_tokenize_on_the_vllm_tier_gives_the_local_engines_tokens(stack: Stack) -> None:
    # both engines serve the same weights with the same tokenizer
    answers = [
        httpx.post(f"{stack.url}/tokenize", json={"inputs": PROMPT}, headers={"X-Tier": tier},
                   timeout=60)
        for tier in (TIER, "small")
    ]  # fmt: skip
    assert [a.status_code for a in answers] == [200, 200]
    on_vllm, on_local = (a.json() for a in answers)
    assert [t["id"] for t in on_vllm] == [t["id"] for t in on_local]
    assert all(PROMPT[t["start"] : t["stop"]] == t["text"] for t in on_vllm)
    assert on_vllm[-1]["stop"] == len(PROMPT)


def curl(url: str, body: object) -> tuple[int, Any]:
    out = subprocess.run(
        ["curl", "-s", "-w", "\n%{http_code}", "-H", "content-type: application/json",
         "-H", f"x-tier: {TIER}", "-d", json.dumps(body), url],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    payload, status = out.stdout.rsplit("\n", 1)
    return int(status), json.loads(payload)


@pytest.mark.parametrize("route", ["/generate", "/generate_stream"])
@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"typical_p": 0.5}, "typical_p"),
        ({"temperature": 0}, "temperature"),
        ({"max_new_tokens": 4000}, "max_new_tokens"),
    ],
)
def test_bad_input_is_tgis_422_in_tgis_shape(
    stack: Stack, route: str, parameters: dict[str, Any], named: str
) -> None:
    status, answer = curl(stack.url + route, {"inputs": PROMPT, "parameters": parameters})
    assert status == 422, answer
    assert answer["error_type"] == "validation" and named in answer["error"]


def test_an_over_long_prompt_is_vllms_refusal_as_tgis_422(stack: Stack) -> None:
    # the router does not count tokens; vLLM refuses, and the router says so in TGI's words
    status, answer = curl(stack.url + "/generate", {"inputs": "Paris " * 3000})
    assert status == 422, answer
    assert answer["error_type"] == "validation" and answer["error"]
