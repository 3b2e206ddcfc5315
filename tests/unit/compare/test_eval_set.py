from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from serve_app.compare.eval_set import Case, EvalSetError, load, normalize, parse

ROOT = Path(__file__).resolve().parents[3]


def test_prompt_and_messages_lines() -> None:
    text = "\n".join(
        [
            json.dumps({"id": "fr", "prompt": "Capital of France?", "expected": "Paris"}),
            "",
            json.dumps({"messages": [{"role": "user", "content": "2+2?"}], "max_tokens": 3}),
        ]
    )
    assert parse(text) == [
        Case("fr", ({"role": "user", "content": "Capital of France?"},), "Paris"),
        Case("3", ({"role": "user", "content": "2+2?"},), None, 3),
    ]


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("not json", "not JSON"),
        ("[1]", "a line is a JSON object"),
        ('{"prompt": "a", "messages": []}', "exactly one of `prompt` and `messages`"),
        ("{}", "exactly one of `prompt` and `messages`"),
        ('{"prompt": ""}', "`prompt` is a non-empty string"),
        ('{"messages": [{"role": "user"}]}', "messages[0] needs a string `role` and `content`"),
        ('{"prompt": "a", "expected": 4}', "`expected` is a string"),
        ('{"prompt": "a", "max_tokens": 0}', "`max_tokens` is a positive integer"),
        ('{"prompt": "a", "max_tokens": true}', "`max_tokens` is a positive integer"),
        ('{"prompt": "a", "answer": "b"}', "unknown field(s) answer"),
        ('{"prompt": "a", "id": [1]}', "`id` is a string or a number"),
    ],
)
def test_a_line_that_cannot_be_used_is_named(line: str, says: str) -> None:
    with pytest.raises(EvalSetError, match=f"eval set:1: .*{re.escape(says)}"):
        parse(line)


def test_ids_are_unique_and_a_set_is_not_empty() -> None:
    with pytest.raises(EvalSetError, match="eval set:2: the id 'a' is used twice"):
        parse('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}')
    with pytest.raises(EvalSetError, match="no cases"):
        parse("\n \n")


def test_an_unreadable_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(EvalSetError, match="cannot read it"):
        load(tmp_path / "missing.jsonl")


def test_normalize_for_exact_match() -> None:
    assert normalize("  Paris.\n") == "paris"
    assert normalize("The  capital\tis PARIS!") == "the capital is paris"
    assert normalize('"4"') == "4"


def test_the_shipped_eval_set_parses() -> None:
    cases = load(ROOT / "bench" / "eval" / "basics.jsonl")
    assert len(cases) >= 20
    assert sum(case.expected is not None for case in cases) >= 20
