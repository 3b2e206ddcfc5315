"""The tokens a TGI answer carries through the router: the engine's count headers first, then
the body's details, then an estimate from the text."""

from __future__ import annotations

import json

import pytest

from serve_app.engine.client import EngineReply
from serve_app.router.accounting import Usage
from serve_app.router.tgi import reply_usage, stream_tokens

COUNTED = (("x-prompt-tokens", "12"), ("x-generated-tokens", "7"))
DETAILED = json.dumps({"generated_text": "Paris", "details": {"generated_tokens": 3}}).encode()


def reply(body: bytes, headers: tuple[tuple[str, str], ...] = ()) -> EngineReply:
    return EngineReply(200, body, headers)


def test_the_engines_count_headers_win_over_the_body() -> None:
    assert reply_usage(reply(DETAILED, COUNTED), prompt_chars=400) == Usage(12, 7)


@pytest.mark.parametrize(
    "headers",
    [
        (("x-prompt-tokens", "12"),),  # one of the two
        (("x-prompt-tokens", "12"), ("x-generated-tokens", "-1")),
        (("x-prompt-tokens", "twelve"), ("x-generated-tokens", "7")),
    ],
)
def test_incomplete_or_bad_headers_fall_back_to_the_body(
    headers: tuple[tuple[str, str], ...],
) -> None:
    # the prompt is then estimated from its characters: about four a token, rounded up
    assert reply_usage(reply(DETAILED, headers), prompt_chars=401) == Usage(101, 3)


def test_generate_answers_details_count_the_generated_tokens() -> None:
    assert reply_usage(reply(DETAILED), prompt_chars=8).completion_tokens == 3


def test_the_list_that_post_slash_answers_is_read_by_its_first_item() -> None:
    body = json.dumps([{"generated_text": "x", "details": {"generated_tokens": 9}}]).encode()
    assert reply_usage(reply(body), prompt_chars=0) == Usage(0, 9)


def test_without_details_the_text_is_counted_at_four_characters_a_token() -> None:
    body = json.dumps({"generated_text": "a" * 9}).encode()
    assert reply_usage(reply(body), prompt_chars=4) == Usage(1, 3)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        json.dumps({"error": "Input validation error", "error_type": "validation"}).encode(),
        json.dumps({"generated_text": 5, "details": {"generated_tokens": "3"}}).encode(),
    ],
)
def test_an_answer_without_text_or_counts_generated_nothing(body: bytes) -> None:
    assert reply_usage(reply(body), prompt_chars=40) == Usage(10, 0)


@pytest.mark.parametrize(
    ("data", "tokens"),
    [
        ('{"index": 1, "token": {"id": 5, "text": " Paris"}, "generated_text": null}', 1),
        ('{"error": "overloaded", "error_type": "overloaded"}', 0),
        ("[DONE]", 0),
        ("", 0),
    ],
)
def test_each_token_event_of_a_stream_is_one_token(data: str, tokens: int) -> None:
    assert stream_tokens(data) == tokens
