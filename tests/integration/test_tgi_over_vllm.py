"""The three client families, unchanged, against a real vLLM tier through the stack: OpenAI's
routes passed to vLLM, TGI's translated to its completions API
(`serve_app.engine.tgi_over_openai`); and the vLLM engine's supervision.

A real Ray head serves configs/local-vllm.yaml as `make up CONFIG=configs/local-vllm.yaml` does:
a local-engine tier and a `launcher: vllm` tier (vLLM's CPU build and the SmolLM2 weights that
`make install-vllm` puts in .vllm/). The openai SDK names the vLLM tier as `model`; TGI's
`text-generation` client, `huggingface_hub.InferenceClient` and curl send `X-Tier`. The last
tests kill vLLM with SIGKILL (the replica recovers) and shut the application down (no vLLM
process is left). Skipped when vLLM is not installed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml
from huggingface_hub import InferenceClient
from text_generation import Client
from text_generation.errors import ValidationError
from text_generation.types import Grammar, GrammarType

from devstack import localstack
from tests.helpers import wait_for
from tests.vllm import ROOT, VLLM_MODEL, needs_vllm, vllm_processes

from .conftest import Stack

pytestmark = needs_vllm
TIER = "vllm-small"
HEADERS = {"X-Tier": TIER}
PROMPT = "What is the capital of France? The capital of France is"


def config() -> dict[str, Any]:
    """configs/local-vllm.yaml's source with its paths made absolute, as `make up` deploys it."""
    shipped = yaml.safe_load((ROOT / "configs" / "src" / "local-vllm.yaml").read_text())
    return localstack.with_absolute_paths(shipped, ROOT)


@pytest.fixture(scope="module")
def stack(ray_head: Stack) -> Iterator[Stack]:
    started = time.monotonic()
    ray_head.deploy(config())
    print(f"\nboth tiers RUNNING {time.monotonic() - started:.1f} s after serve deploy")
    yield ray_head


# -- the openai SDK --------------------------------------------------------------------------


def test_openai_sdk_whole_and_streamed(stack: Stack) -> None:
    openai = stack.openai()
    asked = [{"role": "user", "content": "What is the capital of France?"}]
    whole = openai.chat.completions.create(model=TIER, messages=asked, temperature=0,
                                           max_tokens=16)  # fmt: skip
    text = whole.choices[0].message.content
    assert text is not None and "Paris" in text
    assert whole.usage is not None and whole.usage.completion_tokens >= 1
    chunks = list(openai.chat.completions.create(model="vllm", messages=asked, temperature=0,
                                                 max_tokens=16, stream=True))  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text  # greedy: the same answer, through the alias
    completion = openai.completions.create(model=TIER, prompt=PROMPT, temperature=0, max_tokens=4)
    assert "Paris" in completion.choices[0].text


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


# -- supervision -----------------------------------------------------------------------------


def api_server(stack: Stack) -> int:
    """The engine the replica started: the leader of its own session (the rest of vLLM's
    processes are its children, renamed `VLLM::...`)."""
    (pid,) = [p.pid for p in vllm_processes(stack.env["TMPDIR"]).values() if p.pid == p.session]
    return pid


def answers(stack: Stack) -> bool:
    try:
        reply = stack.openai().completions.create(model=TIER, prompt=PROMPT, max_tokens=2,
                                                  temperature=0, timeout=30)  # fmt: skip
    except Exception:
        return False
    return bool(reply.choices[0].text)


def test_vllm_killed_with_sigkill_is_replaced_and_leaves_nothing(stack: Stack) -> None:
    victim = api_server(stack)
    tree = set(vllm_processes(stack.env["TMPDIR"]))
    assert len(tree) >= 2  # the API server and its engine core, at least
    os.kill(victim, signal.SIGKILL)
    # the replica ends with its engine and takes what is left of vLLM's tree with it
    wait_for(lambda: not tree & set(vllm_processes(stack.env["TMPDIR"])), 60,
             "every process of the killed vLLM to exit")  # fmt: skip
    started = time.monotonic()
    wait_for(lambda: answers(stack), 300, "a replacement vLLM engine that answers")
    print(f"\nanswering again {time.monotonic() - started:.1f} s after the kill")
    assert api_server(stack) != victim
    assert all(answers(stack) for _ in range(3))
    text = client(stack).generate(PROMPT, max_new_tokens=8).generated_text
    assert "Paris" in text


def test_shutdown_leaves_no_vllm_process(stack: Stack) -> None:
    assert vllm_processes(stack.env["TMPDIR"])
    localstack.shutdown(stack.head, stack.env)  # what `make down` does before stopping Ray
    wait_for(lambda: not vllm_processes(stack.env["TMPDIR"]), 60, "no vLLM process left")
