"""The typed requests (`serve_app.router.requests`): each protocol's body parsed once, bounds
checked there, the tier's limits applied when the call is built."""

from __future__ import annotations

import pytest

from serve_app.config import RouterTuning, TierConfig
from serve_app.errors import InvalidRequest
from serve_app.router.requests import parse_generate, parse_openai, parse_tokenize

TIER = TierConfig(name="small", default_max_tokens=64, max_tokens_limit=256)
LIMITS = RouterTuning(max_messages=10)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_a_chat_request_keeps_what_the_router_does_not_read_for_the_engine() -> None:
    body = {"model": "gpt-4o-mini", "messages": QUESTION, "n": 1, "user": "u-1",
            "response_format": {"type": "json_object"}, "temperature": 0.5, "top_p": 1}  # fmt: skip
    parsed = parse_openai("chat", body, LIMITS)
    assert parsed.model == "gpt-4o-mini" and parsed.max_tokens is None
    assert parsed.prompt_chars == len(QUESTION[0]["content"])
    payload = parsed.call(TIER).payload
    assert payload["user"] == "u-1" and payload["response_format"] == {"type": "json_object"}
    assert payload["messages"] == QUESTION and payload["temperature"] == 0.5
    assert "n" not in payload and "top_p" not in payload  # neutral values are not sent on
    assert payload["model"] == TIER.engine.model_id and payload["max_tokens"] == 64


def test_a_stream_always_asks_the_engine_for_usage_and_shows_it_only_when_asked() -> None:
    body = {"model": "small", "messages": QUESTION, "stream": True}
    parsed = parse_openai("chat", body, LIMITS)
    assert not parsed.include_usage
    assert parsed.call(TIER).payload["stream_options"] == {"include_usage": True}
    asked = parse_openai("chat", {**body, "stream_options": {"include_usage": True}}, LIMITS)
    assert asked.include_usage


def test_content_parts_and_a_one_prompt_list_count_their_characters() -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "abc"}, "de"]}]
    assert parse_openai("chat", {"model": "m", "messages": parts}, LIMITS).prompt_chars == 5
    completion = parse_openai("completion", {"model": "m", "prompt": ["hello"]}, LIMITS)
    assert completion.prompt_chars == 5 and completion.call(TIER).payload["prompt"] == "hello"


def test_traits_for_the_auto_rules() -> None:
    body = {"model": "auto", "messages": QUESTION, "max_completion_tokens": 100}
    traits = parse_openai("chat", body, LIMITS).traits({"x-quality": "high"})
    assert traits.max_tokens == 100 and traits.prompt_chars == 30
    assert traits.headers == {"x-quality": "high"}


def test_too_many_messages_are_refused_before_their_shape_is_read() -> None:
    body = {"model": "m", "messages": [{"no": "role"}] * 11}
    with pytest.raises(InvalidRequest, match="holds 11 messages, over the limit of 10") as info:
        parse_openai("chat", body, LIMITS)
    assert info.value.param == "messages"


def test_the_tier_limit_names_the_field_the_client_used() -> None:
    body = {"model": "m", "messages": QUESTION, "max_completion_tokens": 300}
    parsed = parse_openai("chat", body, LIMITS)  # within the protocol's bounds
    with pytest.raises(InvalidRequest, match="above this model's limit of 256") as info:
        parsed.call(TIER)
    assert info.value.param == "max_completion_tokens"


def test_span_attributes_come_from_the_typed_request() -> None:
    body = {"model": "small", "messages": QUESTION, "max_tokens": 8, "temperature": 0.5,
            "stream": True}  # fmt: skip
    assert parse_openai("chat", body, LIMITS).attributes() == {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "small",
        "gen_ai.request.max_tokens": 8,
        "gen_ai.request.temperature": 0.5,
        "serve_app.stream": True,
    }
    tgi = {"inputs": "x", "parameters": {"max_new_tokens": 3, "top_p": 0.9}}
    assert parse_generate("/generate", tgi).attributes() == {
        "gen_ai.operation.name": "text_completion",
        "gen_ai.request.max_tokens": 3,
        "gen_ai.request.top_p": 0.9,
    }


def test_a_generate_body_goes_on_as_it_came_with_the_tiers_default_tokens() -> None:
    body = {"inputs": "Paris is", "parameters": {"temperature": 0.2}}
    parsed = parse_generate("/generate", body)
    assert not parsed.stream and parsed.prompt_chars == 8
    call = parsed.call(TIER)
    assert call.payload == {"inputs": "Paris is",
                            "parameters": {"temperature": 0.2, "max_new_tokens": 64}}  # fmt: skip
    assert call.max_tokens == 64 and call.route == "/generate"
    asked = parse_generate("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 5}})
    assert asked.call(TIER).payload == {"inputs": "x", "parameters": {"max_new_tokens": 5}}


@pytest.mark.parametrize(
    ("route", "body", "stream"),
    [("/", {"inputs": "x", "stream": True}, True), ("/", {"inputs": "x"}, False),
     ("/generate_stream", {"inputs": "x"}, True)],
)  # fmt: skip
def test_which_generate_calls_stream(route: str, body: dict[str, object], stream: bool) -> None:
    assert parse_generate(route, body).stream is stream  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"inputs": "x", "parameters": []}, "`parameters` must be an object"),
        ({"inputs": "x", "parameters": {"max_new_tokens": 8.0}}, "not 8.0"),
        ({"inputs": "x", "parameters": {"max_new_tokens": True}}, "not true"),
    ],
)
def test_bad_generate_bodies_name_the_parameter(body: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message) as info:
        parse_generate("/generate", body)
    assert (info.value.param or "").startswith("parameters")
    too_many = {"inputs": "x", "parameters": {"max_new_tokens": 300}}
    with pytest.raises(InvalidRequest, match="above this tier's limit of 256"):
        parse_generate("/generate", too_many).call(TIER)


def test_stops_are_bounded_in_number_and_length_on_every_route() -> None:
    long_stop = {"model": "m", "messages": QUESTION, "stop": ["ok", "x" * 257]}
    with pytest.raises(InvalidRequest, match="a sequence of 257 characters; at most 256") as info:
        parse_openai("chat", long_stop, LIMITS)
    assert info.value.param == "stop"
    five = {"model": "m", "messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}
    with pytest.raises(InvalidRequest, match="5 sequences; at most 4"):
        parse_openai("chat", five, LIMITS)
    many = {"inputs": "x", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}
    assert parse_generate("/generate", many)  # their number is the engine's (--max-stop-sequences)
    long_tgi = {"inputs": "x", "parameters": {"stop": ["y" * 300]}}
    with pytest.raises(InvalidRequest, match="300 characters"):
        parse_generate("/generate_stream", long_tgi)
    assert parse_generate("/generate", {"inputs": "x", "parameters": {"stop": ["\n"]}})


def test_tools_are_bounded_in_number_and_their_schemas_kept_for_the_grammar_check() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    body = {"model": "m", "messages": QUESTION, "tools": [tool] * 129}
    with pytest.raises(InvalidRequest, match="129 tools, over the limit of 128"):
        parse_openai("chat", body, LIMITS)
    parsed = parse_openai("chat", {**body, "tools": [tool]}, LIMITS)
    assert parsed.grammars.schemas == (({"type": "object"}, "tools[0].function.parameters"),)


def test_a_tier_may_require_max_tokens_on_every_route() -> None:
    strict = TierConfig.model_validate(
        {
            "name": "small",
            "default_max_tokens": 8,
            "max_tokens_limit": 64,
            "tuning": {"require_max_tokens": True},
        }
    )
    chat = {"model": "small", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(InvalidRequest, match=r"`max_tokens` is required .* at most 64") as err:
        parse_openai("chat", chat).call(strict)
    assert err.value.param == "max_tokens"
    with pytest.raises(InvalidRequest, match="`max_completion_tokens` is required"):
        parse_openai("chat", {**chat, "max_completion_tokens": None}).call(strict)
    with pytest.raises(InvalidRequest, match=r"`parameters\.max_new_tokens` is required"):
        parse_generate("/generate", {"inputs": "hi"}).call(strict)
    assert parse_openai("chat", {**chat, "max_tokens": 5}).call(strict).max_tokens == 5
    assert (
        parse_generate("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 5}})
        .call(strict)
        .max_tokens
        == 5
    )


# -- a tier whose engine speaks OpenAI only (vLLM) --------------------------------------------

VLLM_ENGINE = {"launcher": "vllm", "model_id": "served"}
VLLM = TierConfig.model_validate(
    {"name": "v", "engine": VLLM_ENGINE, "default_max_tokens": 64, "max_tokens_limit": 256}
)


def test_a_tgi_request_for_a_vllm_tier_is_a_completions_call_with_its_answer_shape() -> None:
    call = parse_generate("/", {"inputs": "x", "stream": True}).call(VLLM)
    assert call.route == "/v1/completions" and call.stream
    assert call.payload["model"] == "served" and call.payload["max_tokens"] == 64
    assert call.answer is not None and call.answer.shape == "stream"
    assert parse_generate("/generate", {"inputs": "x"}).call(TIER).answer is None


def test_a_vllm_tier_refuses_what_it_cannot_translate_when_the_call_is_made() -> None:
    parsed = parse_generate("/generate", {"inputs": "x", "parameters": {"typical_p": 0.5}})
    assert parsed.call(TIER).payload["parameters"]["typical_p"] == 0.5  # TGI's own to judge
    with pytest.raises(InvalidRequest) as caught:
        parsed.call(VLLM)
    assert caught.value.param == "parameters.typical_p"
    too_many = {"inputs": "x", "parameters": {"max_new_tokens": 999}}
    with pytest.raises(InvalidRequest):  # the tier's limit first, as on every tier
        parse_generate("/generate", too_many).call(VLLM)


def test_tokenize_goes_to_tgis_route_or_is_translated() -> None:
    parsed = parse_tokenize({"inputs": "hi"})
    assert parsed.call(TIER).route == "/tokenize"
    translated = parsed.call(VLLM)
    assert translated.route == "/v1/completions" and translated.payload["echo"] is True
    with pytest.raises(InvalidRequest):
        parse_tokenize({"inputs": 3})
