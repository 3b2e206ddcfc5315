"""The local engine as TGI's own clients and the OpenAI SDK see it."""

from __future__ import annotations

import json

import httpx
import pytest
from huggingface_hub import InferenceClient
from openai import OpenAI
from text_generation import Client

from tests.tools import ASK_WEATHER, WEATHER_TOOL

from .conftest import RunningEngine

QUESTION = "What is the capital of France? Answer in one word."


def test_info_names_the_model(engine: RunningEngine) -> None:
    info = httpx.get(f"{engine.url}/info").json()
    assert info["model_id"] == "smollm2-135m-instruct"
    assert info["max_input_tokens"] == 512 and info["max_total_tokens"] == 1024


def test_tgi_client_generate_answers_paris(engine: RunningEngine) -> None:
    client = Client(engine.url)
    answer = client.generate("The capital of France is", max_new_tokens=5)
    assert "Paris" in answer.generated_text
    assert answer.details.generated_tokens == 5
    assert answer.details.finish_reason == "length"
    assert answer.details.tokens[0].text.strip() == "Paris"


def test_tgi_client_streams_tokens_then_details(engine: RunningEngine) -> None:
    events = list(Client(engine.url).generate_stream("The capital of France is", max_new_tokens=4))
    assert len(events) == 4
    assert all(e.details is None for e in events[:-1])
    assert events[-1].details is not None and events[-1].details.generated_tokens == 4
    assert events[-1].generated_text == "".join(e.token.text for e in events)


def test_inference_client_text_generation_and_chat(engine: RunningEngine) -> None:
    client = InferenceClient(base_url=engine.url)
    text = client.text_generation("The capital of France is", max_new_tokens=3)
    assert "Paris" in text
    reply = client.chat_completion(
        messages=[{"role": "user", "content": QUESTION}], max_tokens=16, temperature=0
    )
    assert "Paris" in reply.choices[0].message.content


def test_openai_sdk_chat_streamed_and_not(engine: RunningEngine) -> None:
    client = OpenAI(base_url=f"{engine.url}/v1", api_key="unused")
    messages = [{"role": "user", "content": QUESTION}]
    reply = client.chat.completions.create(
        model="tgi", messages=messages, max_tokens=16, temperature=0
    )
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model="tgi", messages=messages, max_tokens=16, temperature=0, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == reply.choices[0].message.content


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"temperature": 0}, "`temperature` must be strictly positive"),
        ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
        ({"max_new_tokens": 2000}, "must be <= 1024"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "up to 4 stop sequences"),
    ],
)
def test_validation_errors_are_tgis(
    engine: RunningEngine, parameters: dict[str, object], message: str
) -> None:
    reply = httpx.post(f"{engine.url}/generate", json={"inputs": "Hi", "parameters": parameters})
    assert reply.status_code == 422
    assert reply.json()["error_type"] == "validation"
    assert message in reply.json()["error"]


def test_metrics_expose_the_queue(engine: RunningEngine) -> None:
    text = httpx.get(f"{engine.url}/metrics").text
    assert "tgi_queue_size" in text and "tgi_batch_current_size" in text


def test_openai_sdk_tool_flow_on_the_engine(engine: RunningEngine) -> None:
    client = OpenAI(base_url=f"{engine.url}/v1", api_key="unused")
    reply = client.chat.completions.create(
        model="tgi", messages=ASK_WEATHER, tools=[WEATHER_TOOL], tool_choice="required",
        max_tokens=60, temperature=0,
    )  # fmt: skip
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city", "unit"}
    follow_up = [
        *ASK_WEATHER,
        reply.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "22 degrees and sunny"},
    ]
    final = client.chat.completions.create(
        model="tgi", messages=follow_up, tools=[WEATHER_TOOL], tool_choice="none",
        max_tokens=20, temperature=0,
    )  # fmt: skip
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls


def test_a_chosen_no_tool_answers_in_text(engine: RunningEngine) -> None:
    """TGI's fallback: when the model picks `no_tool`, it generates again without tools. A
    tool named `no_tool` that must be called makes the model's pick certain."""
    no_tool = {"type": "function", "function": {"name": "no_tool", "parameters": {}}}
    body = {"model": "tgi", "messages": ASK_WEATHER, "tools": [no_tool],
            "tool_choice": "required", "max_tokens": 24, "temperature": 0}  # fmt: skip
    reply = httpx.post(f"{engine.url}/v1/chat/completions", json=body, timeout=60).json()
    message = reply["choices"][0]["message"]
    assert "tool_calls" not in message and message["content"]
    stream = httpx.post(f"{engine.url}/v1/chat/completions", json={**body, "stream": True},
                        timeout=60)  # fmt: skip
    chunks = [json.loads(line[5:]) for line in stream.text.splitlines()
              if line.startswith("data:") and "[DONE]" not in line]  # fmt: skip
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert all("tool_calls" not in c["choices"][0]["delta"] for c in chunks)
    assert text[:20] == message["content"][:20]  # greedy: the same answer, streamed as text


def test_inference_client_tools(engine: RunningEngine) -> None:
    client = InferenceClient(base_url=engine.url)
    reply = client.chat_completion(
        messages=ASK_WEATHER, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=60,
        temperature=0,
    )  # fmt: skip
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert reply.choices[0].finish_reason == "stop"  # TGI's own word; OpenAI's is "tool_calls"
    chunks = list(
        client.chat_completion(
            messages=ASK_WEATHER, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=60,
            temperature=0, stream=True,
        )
    )  # fmt: skip
    calls = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices[0].delta.tool_calls]
    assert calls[0].function.name == "get_weather"
    arguments = "".join(c.function.arguments for c in calls)
    assert json.loads(arguments) == json.loads(call.function.arguments)


@pytest.mark.parametrize("text", ["I love 🍕 and 東京", "😀😀😀", "日本語のテキスト"])
def test_tokenize_counts_emoji_and_cjk(engine: RunningEngine, text: str) -> None:
    """Tokens holding part of a character's bytes: the whole text comes back, in order."""
    chat = {"messages": [{"role": "user", "content": text}]}
    for route, body in (("/tokenize", {"inputs": text}), ("/chat_tokenize", chat)):
        answer = httpx.post(f"{engine.url}{route}", json=body, timeout=30)
        assert answer.status_code == 200, (route, answer.text)
    tokens = httpx.post(f"{engine.url}/tokenize", json={"inputs": text}, timeout=30).json()
    assert "".join(t["text"] for t in tokens) == text
    assert len(tokens) > len(text) // 2  # counted as the model counts them, not per character
