"""An eval set: one JSON object per line, a prompt and, optionally, the answer expected.

    {"id": "capital-fr", "prompt": "What is the capital of France?", "expected": "Paris"}
    {"messages": [{"role": "user", "content": "2 + 2 = ?"}], "expected": "4"}

`prompt` (a user message) or `messages` (a chat); `expected` is compared with the answer after
`normalize`; `id` defaults to the line number; `max_tokens` overrides the run's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class EvalSetError(ValueError):
    """The eval set cannot be used as written; the message names the line and what to fix."""


@dataclass(frozen=True)
class Case:
    id: str
    messages: tuple[dict[str, str], ...]
    expected: str | None = None
    max_tokens: int | None = None


def load(path: Path) -> list[Case]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalSetError(f"{path}: cannot read it ({exc})") from None
    return parse(text, str(path))


def parse(text: str, source: str = "eval set") -> list[Case]:
    cases: list[Case] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalSetError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(item, dict):
            raise EvalSetError(f"{where}: a line is a JSON object with `prompt` or `messages`")
        case = _case(item, str(number), where)
        if case.id in seen:
            raise EvalSetError(f"{where}: the id {case.id!r} is used twice")
        seen.add(case.id)
        cases.append(case)
    if not cases:
        raise EvalSetError(f"{source}: no cases (one JSON object per line)")
    return cases


def _case(item: dict[str, Any], number: str, where: str) -> Case:
    unknown = set(item) - {"id", "prompt", "messages", "expected", "max_tokens"}
    if unknown:
        raise EvalSetError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    prompt, messages = item.get("prompt"), item.get("messages")
    if (prompt is None) == (messages is None):
        raise EvalSetError(f"{where}: give exactly one of `prompt` and `messages`")
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt:
            raise EvalSetError(f"{where}: `prompt` is a non-empty string")
        chat: tuple[dict[str, str], ...] = ({"role": "user", "content": prompt},)
    else:
        chat = _messages(messages, where)
    expected = item.get("expected")
    if expected is not None and not isinstance(expected, str):
        raise EvalSetError(f"{where}: `expected` is a string")
    max_tokens = item.get("max_tokens")
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        raise EvalSetError(f"{where}: `max_tokens` is a positive integer")
    case_id = item.get("id", number)
    if not isinstance(case_id, str | int) or isinstance(case_id, bool):
        raise EvalSetError(f"{where}: `id` is a string or a number")
    return Case(str(case_id), chat, expected, max_tokens)


def _messages(messages: Any, where: str) -> tuple[dict[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise EvalSetError(f"{where}: `messages` is a non-empty list")
    chat = []
    for index, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise EvalSetError(f"{where}: messages[{index}] needs a string `role` and `content`")
        chat.append({"role": message["role"], "content": message["content"]})
    return tuple(chat)


_SPACE = re.compile(r"\s+")
_EDGE = re.compile(r"^[\W_]+|[\W_]+$")


def normalize(text: str) -> str:
    """What exact match compares: lower case, runs of space as one, no punctuation at the ends."""
    return _EDGE.sub("", _SPACE.sub(" ", text.strip().lower()))
