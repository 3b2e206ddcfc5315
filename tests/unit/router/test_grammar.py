"""Grammars checked before an engine sees them (`serve_app.router.grammar`): what a request
asks to compile, the tier's policy, and the real pattern compiler with its deadline."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from serve_app.config import GrammarPolicy
from serve_app.errors import InvalidRequest
from serve_app.router.grammar import (
    Grammars,
    PatternCompiler,
    compile_pattern,
    generate_grammars,
    openai_grammars,
)

EXPLODING = "(a|b)*a(a|b){14}"  # a state machine of 2^15 states: minutes in TGI's compiler
SCHEMA = {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}


def test_every_place_a_request_asks_for_a_grammar_is_found() -> None:
    regex = openai_grammars({"response_format": {"type": "regex", "value": "[a-z]+"}})
    assert regex == Grammars(regexes=(("[a-z]+", "response_format.value"),))
    ours = openai_grammars(
        {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}
    )
    tgis = openai_grammars(
        {"response_format": {"type": "json_schema", "value": {"schema": SCHEMA}}}
    )
    plain = openai_grammars({"response_format": {"type": "json", "value": SCHEMA}})
    assert ours.schemas == ((SCHEMA, "response_format.json_schema.schema"),)
    assert tgis.schemas == ((SCHEMA, "response_format.value.schema"),)
    assert plain.schemas == ((SCHEMA, "response_format.value"),)
    tools = [{"type": "function", "function": {"name": "f", "parameters": SCHEMA}}]
    assert openai_grammars({"tools": tools}).schemas == ((SCHEMA, "tools[0].function.parameters"),)
    generate = generate_grammars({"grammar": {"type": "regex", "value": "x+"}})
    assert generate.regexes == (("x+", "parameters.grammar.value"),)
    assert not openai_grammars({"response_format": {"type": "json_object"}})


def test_the_policy_gives_the_patterns_to_build_and_refuses_what_it_forbids() -> None:
    grammars = Grammars(
        (("[a-z]+", "response_format.value"),), ((SCHEMA, "tools[0].function.parameters"),)
    )
    assert grammars.checked(GrammarPolicy()) == (
        ("[a-z]+", "response_format.value"),
        ("^[0-9]{5}$", "tools[0].function.parameters"),
    )
    with pytest.raises(
        InvalidRequest, match=r"regex grammars are off .*grammar.allow_regex"
    ) as info:
        grammars.checked(GrammarPolicy(allow_regex=False))
    assert info.value.param == "response_format.value"
    keys = Grammars(schemas=(({"patternProperties": {"^x-": {}}}, "p"),))
    assert keys.checked(GrammarPolicy()) == (("^x-", "p"),)


@pytest.mark.parametrize(
    ("grammars", "limit"),
    [
        (Grammars((("a" * 513, "rf"),)), "max_pattern_chars"),
        (Grammars(schemas=(({"pattern": "b" * 600}, "tools[0]"),)), "max_pattern_chars"),
        (Grammars(schemas=(({"enum": ["x" * 40_000]}, "rf"),)), "max_schema_bytes"),
        (Grammars(schemas=(({"items": {}}, "rf"),)), None),
    ],
)  # fmt: skip
def test_sizes_and_nesting_are_bounded(grammars: Grammars, limit: str | None) -> None:
    if limit is None:  # within bounds
        assert grammars.checked(GrammarPolicy()) == ()
        return
    with pytest.raises(InvalidRequest, match=f"grammar.{limit}"):
        grammars.checked(GrammarPolicy())


def test_a_schema_nested_too_deep_is_refused() -> None:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(20):
        schema = {"type": "array", "items": schema}
    with pytest.raises(InvalidRequest, match="nests deeper than this model's limit of 16"):
        Grammars(schemas=((schema, "response_format.value"),)).checked(GrammarPolicy())


def test_the_compiler_builds_what_the_engine_can_and_names_what_it_cannot() -> None:
    assert compile_pattern("[a-z]+@[a-z]+\\.com") is None
    assert compile_pattern("(?<=a)b") is not None  # a look-behind: no state machine for it


def test_a_pattern_that_does_not_build_in_time_is_refused_off_the_loop() -> None:
    compiler = PatternCompiler()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    async def run() -> InvalidRequest:
        task = asyncio.create_task(ticker())
        await compiler.check([("[0-9]{3}-[0-9]{4}", "response_format.value")], 5.0)  # warm
        before = ticks
        with pytest.raises(InvalidRequest) as info:
            await compiler.check([(EXPLODING, "response_format.value")], 0.5)
        during = ticks - before
        for _ in range(20):  # sent again: answered from the verdicts kept
            with pytest.raises(InvalidRequest):
                await asyncio.wait_for(compiler.check([(EXPLODING, "p")], 0.5), 0.1)
        task.cancel()
        assert during >= 20  # the loop went on while the worker built (and was killed)
        return info.value

    try:
        error = asyncio.run(run())
    finally:
        compiler.close()
    assert "did not build within 0.5s (grammar.check_timeout_s)" in error.message
    assert error.param == "response_format.value"
