"""The local engine's OpenAI answers against TGI's published schema (pure functions)."""

from __future__ import annotations

from serve_app.local_engine.backend import Finished, Token
from serve_app.local_engine.openai_routes import chat_logprobs
from serve_app.local_engine.scheduler import StreamItem
from tests.openapi import schema_validator

HI = Token(id=1, text="Hi", logprob=-0.5)
ALT = Token(id=2, text="Hello", logprob=-1.5)
EOS = Token(id=0, text="<|im_end|>", logprob=None, special=True)
BLANK = Token(id=0, text="", logprob=None, special=True)


def test_tokens_without_a_logprob_have_no_entry_and_the_rest_match_the_schema() -> None:
    end = Finished(reason="length", generated_tokens=3, input_length=2)
    items = [
        StreamItem(1, HI, (HI, ALT)),
        StreamItem(2, ALT, (ALT, BLANK)),
        StreamItem(3, BLANK, (), end),
    ]
    answer = chat_logprobs(items)
    assert answer == {
        "content": [
            {
                "token": "Hi",
                "logprob": -0.5,
                "top_logprobs": [
                    {"token": "Hi", "logprob": -0.5},
                    {"token": "Hello", "logprob": -1.5},
                ],
            },
            {
                "token": "Hello",
                "logprob": -1.5,
                "top_logprobs": [{"token": "Hello", "logprob": -1.5}],
            },
        ]
    }
    schema_validator("ChatCompletionLogprobs").validate(answer)


def test_a_streamed_end_of_sequence_token_gives_an_empty_but_valid_logprobs_object() -> None:
    answer = chat_logprobs([StreamItem(4, EOS, (), Finished("eos_token", 4, 2))])
    assert answer == {"content": []}
    schema_validator("ChatCompletionLogprobs").validate(answer)
