"""Tool calling the TGI 3.3 way: a JSON grammar over the offered functions, parsed back.

TGI asks the model for one JSON object, `{"function": {"_name": <name>, <arguments>...}}`,
constrained by a JSON schema built from the request's `tools`. `tool_choice` picks which functions
the schema allows: all of them plus a `no_tool` function ("auto", the default), all of them
("required"), one ("function" by name), or none (no grammar, plain chat). When the model picks
`no_tool`, TGI generates again without tools and answers with plain text.

Everything here is pure: request JSON in, typed values out; generated text in, a tool call out.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from .validation import EngineError, wrong_shape

NO_TOOL = "no_tool"
DEFAULT_TOOL_PROMPT = (
    "\nGiven the functions available, please respond with a JSON for a function call with its "
    "proper arguments that best answers the given prompt. Respond in the format "
    "{name: function name, parameters: dictionary of argument name and its value}."
    "Do not use variables.\n"
)


def tool_error(message: str) -> EngineError:
    return EngineError(422, "tool_error", f"Tool error: {message}")


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None
    parameters: dict[str, Any]

    def wire(self) -> dict[str, Any]:
        """As TGI writes a tool into the prompt: the parameters schema as a JSON string."""
        return {
            "type": "function",
            "function": {
                "description": self.description,
                "name": self.name,
                "arguments": _compact(self.parameters),
            },
        }


NO_TOOL_FUNCTION = Function(
    NO_TOOL, "Open ended response with no specific tool selected", {"type": "object"}
)


@dataclass(frozen=True)
class ToolChoice:
    mode: Literal["auto", "none", "required", "function"]
    name: str | None = None


@dataclass(frozen=True)
class ToolRequest:
    """The functions the grammar allows, and the prompt text that offers them."""

    functions: tuple[Function, ...]
    tool_prompt: str

    def schema(self) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {"function": {"anyOf": [_function_schema(f) for f in self.functions]}},
            "required": ["function"],
            "additionalProperties": False,
        }

    def prompt_suffix(self) -> str:
        """What TGI appends to the last message when the chat template has no `tools`."""
        tools = ",".join(_compact(f.wire()) for f in self.functions)
        return f"\n---\n[{tools}]\n{self.tool_prompt}"


def parse_tool_choice(value: Any) -> ToolChoice:
    if value is None or value == "auto":
        return ToolChoice("auto")
    if value in ("none", "required"):
        return ToolChoice(value)
    if isinstance(value, str):
        return ToolChoice("function", value)  # TGI reads any other string as a function name
    if (
        isinstance(value, dict)
        and value.get("type", "function") == "function"
        and isinstance(value.get("function"), dict)
        and isinstance(value["function"].get("name"), str)
    ):
        return ToolChoice("function", value["function"]["name"])
    raise wrong_shape('tool_choice: expected "auto", "none", "required" or a function')


def parse_functions(value: Any) -> tuple[Function, ...]:
    if not isinstance(value, list):
        raise wrong_shape("tools: invalid type, expected a sequence")
    functions = []
    for i, tool in enumerate(value):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or not isinstance(tool.get("type"), str) or fn is None:
            raise wrong_shape(f"tools[{i}]: expected an object with `type` and `function`")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise wrong_shape(f"tools[{i}].function: missing field `name`")
        params = fn.get("parameters", fn.get("arguments"))
        if params is None:
            raise wrong_shape(f"tools[{i}].function: missing field `arguments`")
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise wrong_shape(f"tools[{i}].function.description: invalid type, expected a string")
        functions.append(Function(fn["name"], description, params))
    return tuple(functions)


def tool_request(data: dict[str, Any]) -> ToolRequest | None:
    """The grammar's functions for a chat request, or None when no grammar applies.

    `tools` with `response_format` is refused, as TGI does, even when `tools` is empty.
    """
    if data.get("tools") is None:
        return None
    if data.get("response_format") is not None:
        raise tool_error("Grammar and tools are mutually exclusive")
    functions = parse_functions(data["tools"])
    choice = parse_tool_choice(data.get("tool_choice"))
    if choice.mode == "none":
        return None
    if choice.mode == "function":
        chosen = [f for f in functions if f.name == choice.name]
        if not chosen:
            raise tool_error(f"Tool with name {choice.name} not found")
        functions = (chosen[0],)
    elif choice.mode == "auto":
        functions = (*functions, NO_TOOL_FUNCTION)
    if not functions:
        return None
    prompt = data.get("tool_prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise wrong_shape("tool_prompt: invalid type, expected a string")
    return ToolRequest(functions, prompt or DEFAULT_TOOL_PROMPT)


def _function_schema(fn: Function) -> dict[str, Any]:
    """One function's alternative: `_name` first (so the name streams before the arguments),
    then the declared parameters. Extra properties are refused unless the schema says the
    string "true", as TGI reads it."""
    params = fn.parameters if isinstance(fn.parameters, dict) else {}
    properties: dict[str, Any] = {"_name": {"type": "string", "const": fn.name}}
    declared = params.get("properties")
    if isinstance(declared, dict):
        properties.update(declared)
    required = ["_name"]
    if isinstance(params.get("required"), list):
        required += [r for r in params["required"] if r != "_name"]
    return {
        "type": "object",
        "description": fn.description or "",
        "properties": properties,
        "required": required,
        "additionalProperties": params.get("additionalProperties") == "true",
    }


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# -- answers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text

    def message(self, call_id: str) -> dict[str, Any]:
        """TGI's non-streamed form: `description` kept (null), arguments as a string."""
        return {
            "id": call_id,
            "type": "function",
            "function": {"description": None, "name": self.name, "arguments": self.arguments},
        }


def parse_call(text: str) -> ToolCall | None:
    """The generated JSON as a tool call; None when the model chose `no_tool`."""
    try:
        call = json.loads(text)
        function = call["function"]
        name = function.pop("_name")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise tool_error(f"Failed to parse generated text: {exc} {text!r}") from None
    if not isinstance(name, str):
        raise tool_error(f"Failed to parse generated text: `_name` is not a string {text!r}")
    if name == NO_TOOL:
        return None
    return ToolCall(name, _compact(function))


def next_call_id(messages: list[dict[str, Any]]) -> str:
    """TGI's id for a streamed call: one past the largest integer id already in the
    conversation ("0" for the first), or a UUID once any id is not an integer."""
    next_id = 0
    for message in messages:
        for call in message.get("tool_calls") or ():
            try:
                next_id = max(next_id, int(call["id"]) + 1)
            except (TypeError, KeyError, ValueError):
                return str(uuid.uuid4())
    return str(next_id)


_NAME = re.compile(r'\s*\{\s*"function"\s*:\s*\{\s*"_name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_HELD = "} \t\r\n"


class ToolStream:
    """Turns generated text, piece by piece, into streamed tool-call arguments.

    Nothing is sent until the function's name is complete. Then the arguments stream as the
    object `{<everything after the name>`, holding back trailing braces and blanks until more
    text shows they are not the end: the outer object's closing brace is never sent.
    """

    def __init__(self) -> None:
        self.text = ""
        self.name: str | None = None
        self._start = 0  # where the arguments begin in `text`
        self._sent = 0  # how much of the arguments has been sent
        self._announced = False

    def push(self, piece: str) -> str | None:
        """Add generated text; None while the name is unknown, else the new arguments text."""
        self.text += piece
        if self.name is None:
            match = _NAME.match(self.text)
            if match is None:
                return None
            self.name = json.loads(f'"{match.group(1)}"')
            self._start = match.end()
        return self._more(final=False)

    def name_once(self) -> str | None:
        """The function's name the first time it is asked for once known; None after, as
        TGI's stream names the function in its first tool-call chunk only."""
        if self.name is None or self._announced:
            return None
        self._announced = True
        return self.name

    def finish(self) -> str:
        """The rest of the arguments, once generation has ended."""
        return self._more(final=True) if self.name is not None else ""

    def _more(self, *, final: bool) -> str:
        body = self.text[self._start :].lstrip()
        arguments = "{" + body.removeprefix(",")
        if final:
            trimmed = arguments.rstrip()
            arguments = trimmed[:-1].rstrip() if trimmed.endswith("}") else trimmed
        else:
            arguments = arguments.rstrip(_HELD)
        new = arguments[self._sent :]
        self._sent = max(self._sent, len(arguments))
        return new
