"""What the local engine's routes share, as TGI does it: typed body fields, SSE framing, token
JSON and the character offsets of tokenized text."""

from __future__ import annotations

import json
from typing import Any

import pytest

from serve_app.local_engine.backend import Token, decoded_pieces
from serve_app.local_engine.routes_common import field, required, simple_tokens, sse, token_json
from serve_app.local_engine.validation import EngineError

DESERIALIZE = "Failed to deserialize the JSON body into the target type: "


@pytest.mark.parametrize(
    ("data", "kind", "value"),
    [
        ({"n": 3}, int, 3),
        ({"n": None}, int, None),
        ({}, int, None),
        ({"n": True}, bool, True),
        ({"n": "x"}, str, "x"),
    ],
)
def test_a_field_of_the_right_type_is_taken(data: dict[str, Any], kind: type, value: Any) -> None:
    assert field(data, "n", kind) == value


def test_a_missing_field_takes_its_default() -> None:
    assert field({}, "n", int, default=7) == 7


@pytest.mark.parametrize(
    ("value", "kind"),
    [(True, int), (1, bool), ("3", int), (3.0, int), ([], dict)],
)
def test_a_field_of_another_type_is_refused_as_tgis_extractor_does(value: Any, kind: type) -> None:
    with pytest.raises(EngineError) as info:
        field({"n": value}, "n", kind)
    error = info.value
    assert (error.status, error.plain) == (422, True)
    assert error.message == f"{DESERIALIZE}n: invalid type, expected {kind.__name__}"


@pytest.mark.parametrize("data", [{}, {"inputs": None}])
def test_a_required_field_that_is_absent_or_null_is_missing(data: dict[str, Any]) -> None:
    with pytest.raises(EngineError, match="missing field `inputs`"):
        required(data, "inputs", str)
    assert required({"inputs": "hi"}, "inputs", str) == "hi"


def test_an_sse_event_is_compact_json_after_data() -> None:
    event = sse({"token": {"id": 1, "text": " a"}, "generated_text": None})
    assert event == b'data:{"token":{"id":1,"text":" a"},"generated_text":null}\n\n'


def test_a_token_as_tgi_shows_it() -> None:
    assert token_json(Token(42, " Paris", -0.25)) == {
        "id": 42, "text": " Paris", "logprob": -0.25, "special": False,
    }  # fmt: skip
    assert json.loads(json.dumps(token_json(Token(2, "</s>", None, special=True))))["special"]


def test_simple_tokens_carry_their_offsets_in_the_text() -> None:
    text = "Hello world"
    tokens = [(1, "Hello"), (2, " world")]
    assert simple_tokens(text, tokens) == [
        {"id": 1, "text": "Hello", "start": 0, "stop": 5},
        {"id": 2, "text": " world", "start": 5, "stop": 11},
    ]


def test_a_piece_not_found_in_the_text_starts_at_the_cursor() -> None:
    # a byte-level piece that is no text on its own (shown as U+FFFD), then an empty piece
    tokens = [(1, "ab"), (2, "\ufffd"), (3, "")]
    assert [(t["start"], t["stop"]) for t in simple_tokens("ab\u20ac", tokens)] == [
        (0, 2), (2, 3), (3, 3),
    ]  # fmt: skip


def test_tokens_holding_part_of_a_character_give_it_to_the_one_that_completes_it() -> None:
    pizza = list("🍕".encode())  # four bytes, here over two tokens
    tokens = [{"id": 1, "piece": "I"}, {"id": 2, "piece": pizza[:2]},
              {"id": 3, "piece": pizza[2:]}, {"id": 4, "piece": " 東"}]  # fmt: skip
    pieces = decoded_pieces(tokens)
    assert pieces == [(1, "I"), (2, ""), (3, "🍕"), (4, " 東")]
    text = "I🍕 東"
    spans = [(t["start"], t["stop"]) for t in simple_tokens(text, pieces)]
    assert spans == [(0, 1), (1, 1), (1, 2), (2, 4)]
    assert decoded_pieces([{"id": 5, "piece": [0xF0]}]) == [(5, "\ufffd")]  # never completed
