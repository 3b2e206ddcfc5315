"""Where grammars are checked before an engine sees them.

TGI compiles a request's grammar (a regex, a JSON schema, the schema of the offered tools) into
a state machine inside prefill, on the shard's only loop: a grammar whose machine explodes
(`(a|b)*a(a|b){14}`, or an array of 40 strings of up to 40 characters) takes minutes, the shard
stops answering its health check, and the replica is restarted with every tenant's requests on
it. So the router checks each grammar against the tier's `grammar` policy first:

- statically, once the tier is known: grammars' sizes, nesting and patterns' lengths, and
  whether regex grammars are allowed at all (`Grammars.checked`);
- by compiling it as the engine does (a schema into its regex with outlines-core, the regex
  into its state machine with interegular: TGI 3.3.7's own versions), in a worker process of
  its own with a deadline (`GrammarCompiler`): a grammar not compiled within `check_timeout_s`
  never reaches an engine. The router's event loop never runs the compilation, a worker that
  overruns is killed and replaced, and each request's checks share one time budget. Verdicts
  are remembered, so the same grammar sent again is answered at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import multiprocessing
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Literal

from ..config import GrammarPolicy
from ..errors import AdmissionRefused, InvalidRequest

logger = logging.getLogger("ray.serve")
VERDICTS_KEPT = 4096  # grammars whose verdict is remembered
MAX_PENDING = 32  # grammars waiting for the worker; past this, requests with new ones get a 429
WORKER_START_S = 60.0  # a new worker's start-up (imports), not counted in any deadline
READY = "ready"

Kind = Literal["regex", "schema"]


@dataclass(frozen=True)
class Job:
    """One grammar to compile: a regex, or a JSON schema as JSON text, and its field."""

    kind: Kind
    text: str
    param: str


@dataclass(frozen=True)
class Grammars:
    """The grammars one request asks its engine to compile, each with the field it came from:
    regex grammars, and JSON schemas (a `response_format` or `parameters.grammar`, each tool's
    parameters)."""

    regexes: tuple[tuple[str, str], ...] = ()
    schemas: tuple[tuple[Any, str], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.regexes or self.schemas)

    def checked(self, policy: GrammarPolicy) -> tuple[Job, ...]:
        """The static checks of `policy`; the grammars then to compile (`GrammarCompiler`)."""
        if self.regexes and not policy.allow_regex:
            param = self.regexes[0][1]
            raise InvalidRequest(
                f"`{param}`: regex grammars are off for this model (grammar.allow_regex)",
                param=param,
            )
        jobs = [Job("regex", pattern, param) for pattern, param in self.regexes]
        patterns = list(self.regexes)
        for schema, param in self.schemas:
            text = json.dumps(schema, separators=(",", ":"), sort_keys=True)
            if len(text) > policy.max_schema_bytes:
                raise InvalidRequest(
                    f"`{param}`: the schema is {len(text)} bytes as JSON, over this model's "
                    f"limit of {policy.max_schema_bytes} (grammar.max_schema_bytes)",
                    param=param,
                )
            patterns += _schema_patterns(schema, param, policy.max_schema_depth)
            jobs.append(Job("schema", text, param))
        for pattern, param in patterns:
            if len(pattern) > policy.max_pattern_chars:
                raise InvalidRequest(
                    f"`{param}`: the pattern is {len(pattern)} characters, over this model's "
                    f"limit of {policy.max_pattern_chars} (grammar.max_pattern_chars)",
                    param=param,
                )
        return tuple(jobs)


def openai_grammars(body: Mapping[str, Any]) -> Grammars:
    """`response_format` (TGI's `regex`, `json`/`json_object` with a `value`, `json_schema`
    in OpenAI's or TGI's shape) and the tools' parameters (TGI's `arguments`, or
    `parameters`)."""
    regexes, schemas = _grammar(body.get("response_format"), "response_format")
    tools = body.get("tools")
    if isinstance(tools, list):
        for i, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(function, dict):
                continue
            for key in ("arguments", "parameters"):
                if key in function:
                    schemas.append((_schema(function[key]), f"tools[{i}].function.{key}"))
    return Grammars(tuple(regexes), tuple(schemas))


def generate_grammars(parameters: Mapping[str, Any]) -> Grammars:
    """TGI's `parameters.grammar`."""
    regexes, schemas = _grammar(parameters.get("grammar"), "parameters.grammar")
    return Grammars(tuple(regexes), tuple(schemas))


def _grammar(spec: Any, where: str) -> tuple[list[tuple[str, str]], list[tuple[Any, str]]]:
    if not isinstance(spec, dict):
        return [], []
    kind, value = spec.get("type"), spec.get("value")
    if kind == "regex" and isinstance(value, str):
        return [(value, f"{where}.value")], []
    if kind in ("json", "json_object") and value is not None:
        return [], [(_schema(value), f"{where}.value")]
    if kind == "json_schema":
        for key in ("json_schema", "value"):  # OpenAI's shape, TGI's
            config = spec.get(key)
            if isinstance(config, dict) and "schema" in config:
                return [], [(_schema(config["schema"]), f"{where}.{key}.schema")]
    return [], []


def _schema(value: Any) -> Any:
    """A schema as the engine reads it: TGI takes one sent as a JSON string too."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value  # not JSON: the engine refuses it
    return value


def _schema_patterns(schema: Any, param: str, max_depth: int) -> list[tuple[str, str]]:
    """Every regex in a JSON schema (`pattern` values, `patternProperties` keys); a schema
    nested deeper than `max_depth` is refused."""
    found: list[tuple[str, str]] = []
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


def compile_grammar(kind: Kind, text: str) -> str | None:
    """Compile a grammar as the engine does; None if it compiles, else why not (in the
    worker). A schema the engine's converter cannot turn into a regex is the engine's to
    refuse."""
    import interegular
    from outlines_core.fsm.json_schema import build_regex_from_schema

    try:
        regex = build_regex_from_schema(text) if kind == "schema" else text
    except Exception:
        return None
    try:
        interegular.parse_pattern(regex).to_fsm().reduce()
    except Exception as exc:  # the compiler's own refusal: unsupported syntax, bad escapes
        return f"{type(exc).__name__}: {exc}"[:200]
    return None


def _serve(conn: Connection) -> None:
    """The worker's loop: ready once its imports are done, then a grammar in, its verdict
    out, until the pipe closes."""
    import interegular  # noqa: F401  (imported before the first deadline starts)
    import outlines_core.fsm.json_schema  # noqa: F401

    conn.send(READY)
    while True:
        try:
            kind, text = conn.recv()
        except EOFError:
            return
        conn.send(compile_grammar(kind, text))


class WorkerLost(Exception):
    """The worker died or could not start: the grammar was not checked."""


class GrammarCompiler:
    """One worker process that compiles grammars one at a time, each within its deadline,
    driven by one thread of its own (so a request that goes away never leaves the worker's pipe
    to another); started on first use, replaced when it overruns or dies."""

    def __init__(self) -> None:
        self._thread = concurrent.futures.ThreadPoolExecutor(1, "grammar-check")
        self._worker: tuple[BaseProcess, Connection] | None = None
        self._verdicts: OrderedDict[tuple[Kind, str, float], str | None] = OrderedDict()
        self._pending = 0

    async def check(self, jobs: Sequence[Job], timeout_s: float) -> None:
        """Each job compiles within `timeout_s`, all of them within a budget of a few times
        that, or `InvalidRequest` names the first that does not."""
        budget = max(2.0, 4 * timeout_s)
        try:
            async with asyncio.timeout(budget):
                for job in jobs:
                    verdict = await self._verdict(job, timeout_s)
                    if verdict is not None:
                        raise InvalidRequest(f"`{job.param}`: {verdict}", param=job.param)
        except TimeoutError:
            raise InvalidRequest(
                f"the request's grammars did not all compile within {budget:g}s; send fewer or "
                "simpler ones"
            ) from None

    async def _verdict(self, job: Job, timeout_s: float) -> str | None:
        key = (job.kind, job.text, timeout_s)
        if key in self._verdicts:
            self._verdicts.move_to_end(key)
            return self._verdicts[key]
        if self._pending >= MAX_PENDING:
            raise AdmissionRefused(
                "the router's grammar check is busy; retry in 1s", retry_after_s=1
            )
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            verdict = await loop.run_in_executor(
                self._thread, self._compile, job.kind, job.text, timeout_s
            )
        except WorkerLost:
            return "the grammar could not be checked; retry"  # not remembered
        finally:
            self._pending -= 1
        self._verdicts[key] = verdict
        if len(self._verdicts) > VERDICTS_KEPT:
            self._verdicts.popitem(last=False)
        return verdict

    def _compile(self, kind: Kind, text: str, timeout_s: float) -> str | None:
        """In the compiler's own thread: send, wait for the verdict within the deadline."""
        conn = self._started()
        try:
            conn.send((kind, text))
            if conn.poll(timeout_s):
                verdict: str | None = conn.recv()
                return None if verdict is None else f"the grammar does not compile ({verdict})"
        except (EOFError, OSError) as exc:
            logger.warning("the grammar check's worker died; starting another")
            self._stop()
            raise WorkerLost() from exc
        self._stop()
        return (
            f"the grammar did not compile within {timeout_s:g}s (grammar.check_timeout_s); "
            "simplify it (fewer nested or counted repetitions, shorter length bounds)"
        )

    def _started(self) -> Connection:
        if self._worker is not None and self._worker[0].is_alive():
            return self._worker[1]
        self._stop()
        context = multiprocessing.get_context("spawn")  # nothing of the router's inherited
        ours, theirs = context.Pipe()
        process = context.Process(target=_serve, args=(theirs,), daemon=True)
        process.start()
        theirs.close()
        self._worker = (process, ours)
        try:
            if ours.poll(WORKER_START_S) and ours.recv() == READY:
                return ours
        except (EOFError, OSError):
            pass
        self._stop()
        raise WorkerLost()

    def _stop(self) -> None:
        if self._worker is not None:
            process, conn = self._worker
            self._worker = None
            process.kill()
            process.join(5)
            conn.close()

    def close(self) -> None:
        self._thread.submit(self._stop)
        self._thread.shutdown(wait=True)
