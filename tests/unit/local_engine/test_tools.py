"""TGI's tool calling as pure functions: the grammar, the parse, the streamed arguments."""

from __future__ import annotations

import json
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from serve_app.local_engine.tools import (
    DEFAULT_TOOL_PROMPT,
    NO_TOOL,
    ToolStream,
    next_call_id,
    parse_call,
    tool_request,
)
from serve_app.local_engine.validation import EngineError

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "now", "arguments": {"type": "object"}}}


def request(**fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER, CLOCK], **fields}


@pytest.mark.parametrize(
    ("choice", "names"),
    [
        (None, ["get_weather", "now", NO_TOOL]),
        ("auto", ["get_weather", "now", NO_TOOL]),
        ("required", ["get_weather", "now"]),
        ("now", ["now"]),  # TGI reads any other string as a function name
        ({"type": "function", "function": {"name": "get_weather"}}, ["get_weather"]),
    ],
)
def test_tool_choice_picks_the_grammars_functions(choice: Any, names: list[str]) -> None:
    tools = tool_request(request(tool_choice=choice))
    assert tools is not None
    assert [f.name for f in tools.functions] == names
    alternatives = tools.schema()["properties"]["function"]["anyOf"]
    assert [a["properties"]["_name"]["const"] for a in alternatives] == names
    assert all(next(iter(a["properties"])) == "_name" for a in alternatives)


@pytest.mark.parametrize(
    "fields", [{"tool_choice": "none"}, {"tools": None}, {"tools": [], "tool_choice": "required"}]
)
def test_no_grammar_without_tools_to_call(fields: dict[str, Any]) -> None:
    assert tool_request(request(**fields)) is None


@pytest.mark.parametrize(
    ("fields", "status", "kind", "message"),
    [
        ({"response_format": {"type": "json_object"}}, 422, "tool_error",
         "Tool error: Grammar and tools are mutually exclusive"),
        ({"tools": [], "response_format": {"type": "json_object"}}, 422, "tool_error",
         "mutually exclusive"),
        ({"tool_choice": "get_time"}, 422, "tool_error", "Tool with name get_time not found"),
        ({"tools": {"a": 1}}, 422, "rejected", "tools"),
        ({"tools": [{"type": "function"}]}, 422, "rejected", "tools[0]"),
        ({"tools": [{"type": "function", "function": {"name": "x"}}]}, 422, "rejected",
         "missing field `arguments`"),
        ({"tool_choice": 5}, 422, "rejected", "tool_choice"),
    ],
)  # fmt: skip
def test_refusals_are_tgis(fields: dict[str, Any], status: int, kind: str, message: str) -> None:
    with pytest.raises(EngineError) as info:
        tool_request(request(**fields))
    assert (info.value.status, info.value.kind) == (status, kind)
    assert message in info.value.message


def test_the_schema_accepts_calls_and_refuses_the_rest() -> None:
    tools = tool_request(request())
    assert tools is not None
    check = Draft202012Validator(tools.schema())
    assert check.is_valid({"function": {"_name": "get_weather", "city": "Paris"}})
    assert check.is_valid({"function": {"_name": NO_TOOL}})
    assert not check.is_valid({"function": {"_name": "get_weather"}})  # city is required
    assert not check.is_valid({"function": {"_name": "get_weather", "city": "P", "x": 1}})
    assert not check.is_valid({"function": {"_name": "delete_everything"}})


def test_the_prompt_offers_the_tools_as_tgi_writes_them() -> None:
    tools = tool_request(request(tool_choice="required"))
    assert tools is not None
    suffix = tools.prompt_suffix()
    assert suffix.startswith("\n---\n[") and suffix.endswith(DEFAULT_TOOL_PROMPT)
    offered = json.loads(suffix.split("\n")[2])
    assert offered[0]["function"]["name"] == "get_weather"
    assert json.loads(offered[0]["function"]["arguments"])["required"] == ["city"]
    custom = tool_request(request(tool_prompt="Use a tool."))
    assert custom is not None and custom.prompt_suffix().endswith("\nUse a tool.")


@pytest.mark.parametrize(
    ("text", "name", "arguments"),
    [
        ('{"function": {"_name": "get_weather", "city": "Paris"}}', "get_weather",
         {"city": "Paris"}),
        ('{"function": {"_name": "now"}}', "now", {}),
        ('{"function": {"_name": "no_tool"}}', None, None),
    ],
)  # fmt: skip
def test_parse_call(text: str, name: str | None, arguments: dict[str, Any] | None) -> None:
    call = parse_call(text)
    if name is None:
        assert call is None
        return
    assert call is not None and call.name == name
    assert json.loads(call.arguments) == arguments
    wire = call.message("0")
    assert wire["id"] == "0" and wire["type"] == "function"
    assert wire["function"] == {"description": None, "name": name, "arguments": call.arguments}


@pytest.mark.parametrize("text", ['{"function": {"_name": "get_weather", "ci', "[]", '{"f": 1}'])
def test_unparsable_output_is_a_tool_error(text: str) -> None:
    with pytest.raises(EngineError) as info:
        parse_call(text)
    assert info.value.kind == "tool_error" and "Failed to parse generated text" in str(info.value)


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([{"role": "user", "content": "hi"}], "0"),
        ([{"role": "assistant", "tool_calls": [{"id": "0"}, {"id": "4"}]}], "5"),
    ],
)
def test_streamed_call_ids_follow_the_conversation(
    messages: list[dict[str, Any]], expected: str
) -> None:
    assert next_call_id(messages) == expected


def test_streamed_call_ids_fall_back_to_a_uuid() -> None:
    assert len(next_call_id([{"role": "assistant", "tool_calls": [{"id": "call_x"}]}])) == 36


# Token pieces as a model writes them; the arguments must come out whole, once, in order.
PIECES = ['{"', "function", '":', ' {"', "_", "name", '":', ' "', "get", "_weather", '",',
          ' "', "city", '":', ' "', "Par", "is", '"}', "}"]  # fmt: skip


@pytest.mark.parametrize(
    ("pieces", "name", "arguments"),
    [
        (PIECES, "get_weather", {"city": "Paris"}),
        (['{"function": {"_name": "now"}}'], "now", {}),
        (['{"function":{"_name":"now"', "}", "}"], "now", {}),
        (['{"function": {"_name": "set", "v": "}}"}}'], "set", {"v": "}}"}),
    ],
)
def test_streamed_arguments_join_into_the_call(
    pieces: list[str], name: str, arguments: dict[str, Any]
) -> None:
    stream = ToolStream()
    sent = [stream.push(p) for p in pieces]
    names = [n for n in (stream.name_once(), stream.name_once()) if n]
    whole = "".join(s or "" for s in sent) + stream.finish()
    assert stream.name == name and names == [name]
    assert json.loads(whole) == arguments
    first = next(i for i, s in enumerate(sent) if s is not None)
    assert all(s is None for s in sent[:first]) and sent[first].startswith("{")


def test_nothing_is_sent_before_the_name_is_complete() -> None:
    stream = ToolStream()
    assert [stream.push(p) for p in PIECES[:9]] == [None] * 9  # ... "get" of "get_weather"
    assert stream.name is None and stream.finish() == ""
