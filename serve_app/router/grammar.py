"""Where grammars are checked before an engine sees them.

TGI compiles a request's grammar (a regex, a JSON schema, the schema of the offered tools) into
a state machine inside prefill, on the shard's only loop: a pattern whose machine explodes
(`(a|b)*a(a|b){14}` takes minutes) stops the shard from answering its health check, and the
replica is restarted with every tenant's requests on it. So the router checks each grammar
against the tier's `grammar` policy first:

- statically, when the request is parsed (`serve_app.router.requests`): grammars on at all,
  regex grammars allowed, patterns and schemas within their sizes and nesting;
- by building the pattern's state machine the way the engine's compiler does (interegular, as
  TGI's outlines), in a worker process of its own with a deadline (`PatternCompiler`): a pattern
  that is not built within `check_timeout_s` never reaches an engine. The router's event loop
  never runs the compilation, and a worker that overruns is killed. Verdicts are remembered, so
  the same pattern sent again is answered at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from ..config import GrammarPolicy
from ..errors import InvalidRequest

logger = logging.getLogger("ray.serve")
VERDICTS_KEPT = 4096  # patterns whose verdict is remembered


Pattern = tuple[str, str]  # a regex, and the field it came from


@dataclass(frozen=True)
class Grammars:
    """The grammars one request asks its engine to compile, each with the field it came from:
    regex grammars, and JSON schemas (a `response_format` or `parameters.grammar`, each tool's
    parameters)."""

    regexes: tuple[Pattern, ...] = ()
    schemas: tuple[tuple[Any, str], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.regexes or self.schemas)

    def checked(self, policy: GrammarPolicy) -> tuple[Pattern, ...]:
        """The static checks of `policy`; the patterns whose state machines must then be built
        (`PatternCompiler`): the regex grammars and every schema's `pattern` and
        `patternProperties`."""
        if self.regexes and not policy.allow_regex:
            param = self.regexes[0][1]
            raise InvalidRequest(
                f"`{param}`: regex grammars are off for this model (grammar.allow_regex)",
                param=param,
            )
        patterns = list(self.regexes)
        for schema, param in self.schemas:
            size = len(json.dumps(schema, separators=(",", ":")))
            if size > policy.max_schema_bytes:
                raise InvalidRequest(
                    f"`{param}`: the schema is {size} bytes as JSON, over this model's limit of "
                    f"{policy.max_schema_bytes} (grammar.max_schema_bytes)",
                    param=param,
                )
            patterns += _schema_patterns(schema, param, policy.max_schema_depth)
        for pattern, param in patterns:
            if len(pattern) > policy.max_pattern_chars:
                raise InvalidRequest(
                    f"`{param}`: the pattern is {len(pattern)} characters, over this model's "
                    f"limit of {policy.max_pattern_chars} (grammar.max_pattern_chars)",
                    param=param,
                )
        return tuple(patterns)


def openai_grammars(body: Mapping[str, Any]) -> Grammars:
    """`response_format` (TGI's `regex`, `json`/`json_object` with a `value`, `json_schema`
    in OpenAI's or TGI's shape) and the tools' parameters."""
    regexes, schemas = _grammar(body.get("response_format"), "response_format")
    tools = body.get("tools")
    if isinstance(tools, list):
        for i, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            if isinstance(function, dict) and "parameters" in function:
                schemas.append((function["parameters"], f"tools[{i}].function.parameters"))
    return Grammars(tuple(regexes), tuple(schemas))


def generate_grammars(parameters: Mapping[str, Any]) -> Grammars:
    """TGI's `parameters.grammar`."""
    regexes, schemas = _grammar(parameters.get("grammar"), "parameters.grammar")
    return Grammars(tuple(regexes), tuple(schemas))


def _grammar(spec: Any, where: str) -> tuple[list[Pattern], list[tuple[Any, str]]]:
    if not isinstance(spec, dict):
        return [], []
    kind, value = spec.get("type"), spec.get("value")
    if kind == "regex" and isinstance(value, str):
        return [(value, f"{where}.value")], []
    if kind in ("json", "json_object") and value is not None:
        return [], [(value, f"{where}.value")]
    if kind == "json_schema":
        for key in ("json_schema", "value"):  # OpenAI's shape, TGI's
            config = spec.get(key)
            if isinstance(config, dict) and "schema" in config:
                return [], [(config["schema"], f"{where}.{key}.schema")]
    return [], []


def _schema_patterns(schema: Any, param: str, max_depth: int) -> list[Pattern]:
    """Every regex in a JSON schema (`pattern` values, `patternProperties` keys); a schema
    nested deeper than `max_depth` is refused."""
    found: list[Pattern] = []
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        if depth > max_depth:
            raise InvalidRequest(
                f"`{param}`: the schema nests deeper than this model's limit of {max_depth} "
                "(grammar.max_schema_depth)",
                param=param,
            )
        if isinstance(node, dict):
            if isinstance(node.get("pattern"), str):
                found.append((node["pattern"], param))
            if isinstance(node.get("patternProperties"), dict):
                found += [(key, param) for key in node["patternProperties"]]
            stack += [(v, depth + 1) for v in node.values()]
        else:
            stack += [(v, depth + 1) for v in node]
    return found


def compile_pattern(pattern: str) -> str | None:
    """Build `pattern`'s state machine; None if it builds, else why not (in the worker)."""
    import interegular

    try:
        interegular.parse_pattern(pattern).to_fsm().reduce()
    except Exception as exc:  # the compiler's own refusal: unsupported syntax, bad escapes
        return f"{type(exc).__name__}: {exc}"[:200]
    return None


def _serve(conn: Connection) -> None:
    """The worker's loop: a pattern in, its verdict out, until the pipe closes."""
    while True:
        try:
            pattern = conn.recv()
        except EOFError:
            return
        conn.send(compile_pattern(pattern))


class PatternCompiler:
    """One worker process that builds patterns' state machines, one at a time, each within
    its deadline; started on first use, replaced when it overruns or dies."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._worker: tuple[BaseProcess, Connection] | None = None
        self._verdicts: OrderedDict[tuple[str, float], str | None] = OrderedDict()

    async def check(self, patterns: Iterable[Pattern], timeout_s: float) -> None:
        """Each `(pattern, param)` builds within `timeout_s`, or `InvalidRequest` names it."""
        for pattern, param in patterns:
            verdict = await self._verdict(pattern, timeout_s)
            if verdict is not None:
                raise InvalidRequest(f"`{param}`: {verdict}", param=param)

    async def _verdict(self, pattern: str, timeout_s: float) -> str | None:
        key = (pattern, timeout_s)
        if key in self._verdicts:
            self._verdicts.move_to_end(key)
            return self._verdicts[key]
        loop = asyncio.get_running_loop()
        async with self._lock:
            verdict = await loop.run_in_executor(None, self._compile, pattern, timeout_s)
        self._verdicts[key] = verdict
        if len(self._verdicts) > VERDICTS_KEPT:
            self._verdicts.popitem(last=False)
        return verdict

    def _compile(self, pattern: str, timeout_s: float) -> str | None:
        """In a thread of the loop's executor: send, wait for the verdict within the deadline."""
        _, conn = self._started()
        try:
            conn.send(pattern)
            if conn.poll(timeout_s):
                verdict: str | None = conn.recv()
                return None if verdict is None else f"the pattern does not compile ({verdict})"
        except (EOFError, OSError):
            logger.warning("the grammar check's worker died; starting another")
            self._stop()
            return "the pattern could not be checked; retry, or simplify it"
        self._stop()
        return (
            f"the pattern's state machine did not build within {timeout_s:g}s "
            "(grammar.check_timeout_s); simplify it (fewer nested or counted repetitions)"
        )

    def _started(self) -> tuple[BaseProcess, Connection]:
        if self._worker is None or not self._worker[0].is_alive():
            context = multiprocessing.get_context("spawn")  # nothing of the router's inherited
            ours, theirs = context.Pipe()
            process = context.Process(target=_serve, args=(theirs,), daemon=True)
            process.start()
            theirs.close()
            self._worker = (process, ours)
        return self._worker

    def _stop(self) -> None:
        if self._worker is not None:
            process, conn = self._worker
            self._worker = None
            process.kill()
            process.join(5)
            conn.close()

    def close(self) -> None:
        self._stop()
