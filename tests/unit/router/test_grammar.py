"""Grammars checked before an engine sees them (`serve_app.router.grammar`): what a request
asks to compile, the tier's policy, and the real pattern compiler with its deadline."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from serve_app.config import GrammarPolicy
from serve_app.errors import InvalidRequest
from serve_app.router.grammar import (
    GrammarCompiler,
    Grammars,
    Job,
    compile_grammar,
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
    as_string = {"name": "g", "arguments": json.dumps(SCHEMA)}
    tools = [{"type": "function", "function": {"name": "f", "parameters": SCHEMA}},
             {"type": "function", "function": as_string}]  # fmt: skip
    assert openai_grammars({"tools": tools}).schemas == (
        (SCHEMA, "tools[0].function.parameters"),
        (SCHEMA, "tools[1].function.arguments"),  # TGI's own name, the schema as a string
    )
    as_text = openai_grammars({"response_format": {"type": "json", "value": json.dumps(SCHEMA)}})
    assert as_text.schemas == ((SCHEMA, "response_format.value"),)
    generate = generate_grammars({"grammar": {"type": "regex", "value": "x+"}})
    assert generate.regexes == (("x+", "parameters.grammar.value"),)
    assert not openai_grammars({"response_format": {"type": "json_object"}})


def test_the_policy_gives_the_grammars_to_compile_and_refuses_what_it_forbids() -> None:
    tool = "tools[0].function.parameters"
    grammars = Grammars((("[a-z]+", "response_format.value"),), ((SCHEMA, tool),))
    assert grammars.checked(GrammarPolicy()) == (
        Job("regex", "[a-z]+", "response_format.value"),
        Job("schema", json.dumps(SCHEMA, separators=(",", ":"), sort_keys=True), tool),
    )
    with pytest.raises(
        InvalidRequest, match=r"regex grammars are off .*grammar.allow_regex"
    ) as info:
        grammars.checked(GrammarPolicy(allow_regex=False))
    assert info.value.param == "response_format.value"
    keys = Grammars(schemas=(({"patternProperties": {"x" * 600: {}}}, "p"),))
    with pytest.raises(InvalidRequest, match=r"grammar\.max_pattern_chars"):
        keys.checked(GrammarPolicy())


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
        assert [job.kind for job in grammars.checked(GrammarPolicy())] == ["schema"]
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
    assert compile_grammar("regex", "[a-z]+@[a-z]+\\.com") is None
    assert compile_grammar("regex", "(?<=a)b") is not None  # a look-behind: no state machine
    assert compile_grammar("schema", json.dumps(SCHEMA)) is None


def test_a_grammar_that_does_not_compile_in_time_is_refused_off_the_loop() -> None:
    compiler = GrammarCompiler()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    async def run() -> InvalidRequest:
        task = asyncio.create_task(ticker())
        await compiler.check([Job("regex", "[0-9]{3}-[0-9]{4}", "response_format.value")], 5.0)
        before = ticks
        with pytest.raises(InvalidRequest) as info:
            await compiler.check([Job("regex", EXPLODING, "response_format.value")], 0.5)
        during = ticks - before
        for _ in range(20):  # sent again: answered from the verdicts kept
            with pytest.raises(InvalidRequest):
                await asyncio.wait_for(compiler.check([Job("regex", EXPLODING, "p")], 0.5), 0.1)
        # A schema with no pattern at all whose state machine explodes all the same.
        strings = {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 40}
        with pytest.raises(InvalidRequest, match="did not compile within"):
            await compiler.check([Job("schema", json.dumps(strings), "tools[0]")], 0.5)
        # A request that goes away mid-check leaves the worker to the next one, whole.
        slow = asyncio.create_task(compiler.check([Job("regex", "(a|b)*a(a|b){10}", "p")], 5))
        await asyncio.sleep(0.02)
        slow.cancel()
        with pytest.raises(InvalidRequest, match="did not compile within"):
            await compiler.check([Job("regex", "(a|b)*a(a|b){13}", "p")], 0.5)
        task.cancel()
        assert during >= 20  # the loop went on while the worker built (and was killed)
        return info.value

    try:
        error = asyncio.run(run())
    finally:
        compiler.close()
    assert "did not compile within 0.5s (grammar.check_timeout_s)" in error.message
    assert error.param == "response_format.value"
