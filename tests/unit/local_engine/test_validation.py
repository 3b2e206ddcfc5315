"""The local engine's request validation, TGI's rules as pure functions."""

from __future__ import annotations

from typing import Any

import pytest

from serve_app.local_engine.cli import parse_args
from serve_app.local_engine.validation import EngineError, check_lengths, check_sampling

ARGS, _ = parse_args(["--max-input-tokens", "512", "--max-total-tokens", "1024"])


# (parameters, chat?, stream?, TGI's message or None when accepted)
RULES: list[tuple[dict[str, Any], bool, bool, str | None]] = [
    ({"temperature": 0}, False, False, "`temperature` must be strictly positive"),
    ({"temperature": 0}, True, False, None),  # chat: 0 means greedy
    ({"temperature": -0.5}, True, False, "`temperature` must be strictly positive"),
    ({"top_p": 1.0}, False, False, "`top_p` must be > 0.0 and < 1.0"),
    ({"top_p": 1.0}, True, False, "`top_p` must be > 0.0 and < 1.0"),
    ({"top_p": 0.9}, True, False, None),
    ({"typical_p": 1.0}, False, False, "`typical_p` must be > 0.0 and < 1.0"),
    ({"top_k": 0}, False, False, "`top_k` must be strictly positive"),
    ({"repetition_penalty": 0}, False, False, "`repetition_penalty` must be strictly positive"),
    ({"frequency_penalty": 2.5}, False, False, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"max_new_tokens": 0}, False, False, "`max_new_tokens` must be strictly positive"),
    ({"stop": ["a"] * 5}, False, False, "`stop` supports up to 4 stop sequences. Given: 5"),
    ({"top_n_tokens": 6}, False, False, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
    ({"truncate": 0}, False, False,
     "`truncate` must be strictly positive and less than 512. Given: 0"),
    ({"truncate": 513}, False, False,
     "`truncate` must be strictly positive and less than 512. Given: 513"),
    ({"truncate": 512}, False, False, None),
    ({"best_of": 2}, False, False, "you must use sampling when `best_of` is > 1"),
    ({"best_of": 2, "do_sample": True, "seed": 1}, False, False,
     "`seed` must not be set when `best_of` > 1"),
    ({"best_of": 2, "do_sample": True}, False, True,
     "`best_of` != 1 is not supported when streaming tokens"),
    ({"best_of": 3, "do_sample": True}, False, False, "`best_of` must be > 0 and <= 2. Given: 3"),
    ({"decoder_input_details": True}, False, True,
     "`decoder_input_details` == true is not supported when streaming tokens"),
    ({"decoder_input_details": True}, False, False, None),
]  # fmt: skip


@pytest.mark.parametrize(("params", "chat", "stream", "message"), RULES)
def test_tgis_validation_rules(
    params: dict[str, Any], chat: bool, stream: bool, message: str | None
) -> None:
    if message is None:
        check_sampling(params, ARGS, stream=stream, chat=chat)
        return
    with pytest.raises(EngineError) as info:
        check_sampling(params, ARGS, stream=stream, chat=chat)
    assert (info.value.status, info.value.kind) == (422, "validation")
    assert info.value.message == f"Input validation error: {message}"


@pytest.mark.parametrize(
    ("params", "chat", "greedy"),
    [({}, False, True), ({"do_sample": True}, False, False), ({"top_k": 5}, False, False),
     ({}, True, False), ({"temperature": 0}, True, True), ({"temperature": 0.7}, True, False)],
)  # fmt: skip
def test_greedy_as_tgi_decides_it(params: dict[str, Any], chat: bool, greedy: bool) -> None:
    assert (check_sampling(params, ARGS, stream=False, chat=chat).temperature == 0) == greedy


@pytest.mark.parametrize(
    ("input_length", "params", "result"),
    [
        (10, {}, 1014),  # no max_new_tokens: the rest of the budget
        (10, {"max_new_tokens": 5}, 5),
        (600, {"max_new_tokens": 5}, "`inputs` must have less than 512 tokens. Given: 600"),
        (600, {"max_new_tokens": 5, "truncate": 100}, 5),  # truncated first
        (1020, {"max_new_tokens": 5}, "`inputs` tokens + `max_new_tokens` must be <= 1024"),
    ],
)
def test_token_budget(input_length: int, params: dict[str, Any], result: int | str) -> None:
    sampling = check_sampling(params, ARGS, stream=False)
    if isinstance(result, int):
        assert check_lengths(sampling, input_length, ARGS).max_new_tokens == result
        return
    with pytest.raises(EngineError) as info:
        check_lengths(sampling, input_length, ARGS)
    assert result in info.value.message
