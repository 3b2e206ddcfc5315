"""TGI's clients, unchanged, against a vLLM tier: the router's TGI routes translated to a real
vLLM's completions API (`serve_app.engine.tgi_over_openai`).

A real vLLM (the CPU build `make install-vllm` puts in .vllm/, with the SmolLM2 weights it
converts) runs as its own process; the router's ASGI app serves real HTTP on a port of its own,
its one tier (`launcher: vllm`) reached in process. TGI's `text-generation` client,
`huggingface_hub.InferenceClient` and curl talk to it. Skipped when vLLM is not installed
(`VLLM_DIR` names another place than the checkout's .vllm/).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from huggingface_hub import InferenceClient
from text_generation import Client
from text_generation.errors import ValidationError
from text_generation.types import Grammar, GrammarType

from devstack.hosts import free_port
from serve_app.config import AppConfig
from serve_app.engine.client import EngineClient
from serve_app.router.routes import Router
from tests.helpers import wait_for
from tests.unit.router.doubles import DirectTransport
from tests.unit.router.router_kit import ListRecorder

ROOT = Path(__file__).resolve().parents[2]
VLLM_DIR = Path(os.environ.get("VLLM_DIR", ROOT / ".vllm"))
PYTHON = VLLM_DIR / "venv" / "bin" / "python"
MODEL = VLLM_DIR / "models" / "smollm2-135m-instruct"
PROMPT = "What is the capital of France? The capital of France is"
TIER = {"X-Tier": "vllm"}

pytestmark = pytest.mark.skipif(
    not (PYTHON.exists() and (MODEL / "config.json").exists()),
    reason=f"vLLM is not installed in {VLLM_DIR} (make install-vllm)",
)


@pytest.fixture(scope="module")
def vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """vLLM's OpenAI server on CPU, as docs/engines.md starts it; stopped with its group."""
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1"}  # fmt: skip
    argv = [str(PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL),
            "--served-model-name", str(MODEL), "--host", "127.0.0.1", "--port", str(port),
            "--max-model-len", "2048", "--dtype", "bfloat16", "--enforce-eager"]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"vLLM exited with {process.returncode}:\n{log.read_text()}")
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, 240, "vLLM to be healthy")
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


class Served:
    def __init__(self, url: str, recorder: ListRecorder) -> None:
        self.url = url
        self.recorder = recorder


@pytest.fixture(scope="module")
def router(vllm: str) -> Iterator[Served]:
    """The router with one vLLM tier, on a real port."""
    engine = {"launcher": "vllm", "model_id": str(MODEL), "max_input_tokens": 1536,
              "max_total_tokens": 2048}  # fmt: skip
    tier = {"name": "vllm", "engine": engine, "default_max_tokens": 32, "max_tokens_limit": 512}
    config = AppConfig.model_validate({"router": {"default_tier": "vllm"}, "tiers": [tier]})
    recorder = ListRecorder()
    app = Router(config, DirectTransport({"vllm": EngineClient(vllm, 120)}), recorder).asgi_app()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="router", daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, "the router to listen")
    try:
        yield Served(f"http://127.0.0.1:{port}", recorder)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# -- TGI's own client ------------------------------------------------------------------------


def test_text_generation_client_generate_with_details(router: Served) -> None:
    client = Client(router.url, headers=TIER, timeout=120)
    answer = client.generate(PROMPT, max_new_tokens=8, decoder_input_details=True)
    assert "Paris" in answer.generated_text
    details = answer.details
    assert details.finish_reason.value in ("eos_token", "length")
    assert details.generated_tokens == len(details.tokens) >= 1
    assert "".join(t.text for t in details.tokens if not t.special) == answer.generated_text
    assert len(details.prefill) == 12 and details.prefill[0].logprob is None  # the prompt's
    assert all(t.logprob is not None for t in details.tokens)


def test_text_generation_client_generate_stream(router: Served) -> None:
    client = Client(router.url, headers=TIER, timeout=120)
    events = list(client.generate_stream(PROMPT, max_new_tokens=8))
    assert [e.details is None for e in events] == [True] * (len(events) - 1) + [False]
    last = events[-1]
    assert last.generated_text == "".join(e.token.text for e in events if not e.token.special)
    assert "Paris" in last.generated_text
    assert last.details.generated_tokens == len(events)


def test_stop_sequences_and_a_regex_grammar(router: Served) -> None:
    client = Client(router.url, headers=TIER, timeout=120)
    stopped = client.generate(PROMPT, max_new_tokens=16, stop_sequences=[" Paris"])
    assert stopped.generated_text == " Paris"  # TGI keeps the stop sequence
    assert stopped.details.finish_reason.value == "stop_sequence"
    digits = client.generate(
        "My favourite number is",
        max_new_tokens=8,
        grammar=Grammar(type=GrammarType.Regex, value="[0-9]{3}"),
    )
    assert re.fullmatch("[0-9]{3}", digits.generated_text)


def test_seeded_sampling_repeats(router: Served) -> None:
    client = Client(router.url, headers=TIER, timeout=120)
    first, second = (
        client.generate(PROMPT, max_new_tokens=8, do_sample=True, temperature=0.9, seed=7)
        for _ in range(2)
    )
    assert first.generated_text == second.generated_text
    assert first.details.seed == 7


def test_what_vllm_cannot_do_is_tgis_validation_error(router: Served) -> None:
    client = Client(router.url, headers=TIER, timeout=120)
    for asked in ({"typical_p": 0.5}, {"watermark": True}, {"top_n_tokens": 2}):
        with pytest.raises(ValidationError, match=next(iter(asked))):
            client.generate(PROMPT, max_new_tokens=4, **asked)


# -- huggingface_hub -------------------------------------------------------------------------


def test_inference_client_text_generation_whole_streamed_and_detailed(router: Served) -> None:
    client = InferenceClient(base_url=router.url, headers=TIER, timeout=120)
    text = client.text_generation(PROMPT, max_new_tokens=8)
    assert isinstance(text, str) and "Paris" in text
    pieces = list(client.text_generation(PROMPT, max_new_tokens=8, stream=True))
    assert "".join(pieces) == text  # greedy: the same answer, its special tokens left out
    detailed = client.text_generation(PROMPT, max_new_tokens=8, details=True)
    assert detailed.generated_text == text  # greedy: the same answer
    assert detailed.details is not None and detailed.details.generated_tokens >= 1


# -- curl: TGI's error shape, the route's status ---------------------------------------------


def curl(url: str, body: object) -> tuple[int, object]:
    out = subprocess.run(
        ["curl", "-s", "-w", "\n%{http_code}", "-H", "content-type: application/json",
         "-H", "x-tier: vllm", "-d", json.dumps(body), url],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    payload, status = out.stdout.rsplit("\n", 1)
    return int(status), json.loads(payload)


def test_bad_input_is_tgis_422_in_tgis_shape(router: Served) -> None:
    for body, param in [
        ({"inputs": PROMPT, "parameters": {"typical_p": 0.5}}, "typical_p"),
        ({"inputs": PROMPT, "parameters": {"temperature": 0}}, "temperature"),
        ({"inputs": "", "parameters": {}}, "inputs"),
        ({"inputs": PROMPT, "parameters": {"max_new_tokens": 4000}}, "max_new_tokens"),
    ]:
        for route in ("/generate", "/generate_stream"):
            status, answer = curl(router.url + route, body)
            assert status == 422, (route, body, answer)
            assert isinstance(answer, dict) and answer["error_type"] == "validation"
            assert param in answer["error"]


def test_an_over_long_prompt_is_vllms_refusal_as_tgis_422(router: Served) -> None:
    # the router does not count tokens; vLLM refuses, and the router says it in TGI's words
    status, answer = curl(router.url + "/generate", {"inputs": "Paris " * 3000})
    assert status == 422 and isinstance(answer, dict)
    assert answer["error_type"] == "validation" and answer["error"]


def test_every_request_was_settled(router: Served) -> None:
    assert router.recorder.gauges.get("vllm", 0) == 0
    statuses = {s for _, s, _ in router.recorder.outcomes}
    assert statuses <= {200, 422}
    assert any(u.completion_tokens > 0 for _, s, u in router.recorder.outcomes if s == 200)
