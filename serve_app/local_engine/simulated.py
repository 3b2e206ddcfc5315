"""A backend without a model, for measuring the serving path alone.

Selected with `--model-id simulated`. It speaks the same protocol through the same scheduler (so
admission, queueing, batch slots and TGI's metrics behave as with a model), and generates on a
timetable: the first token after `--sim-ttft-ms`, then one every `--sim-itl-ms`, up to
`--sim-output-tokens` (then end-of-sequence) or `max_new_tokens`; `--sim-failure-rate` makes
that share of generations fail with a 500, as a faulty engine version would. For benchmarks,
autoscaling and rollout experiments only; functional tests use the real model.

One process streams tens of thousands of tokens/s (bench/sim_engine.py; docs/benchmarks.md):
the tokens are made once, not per stream and step. Each stream keeps its own timer: one timer
per decode step for all streams (as a real engine's batch) was measured and made the streams
emit in bursts, which cost more at the client than the timers saved.
"""

from __future__ import annotations

import asyncio
import random
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from .backend import Finished, GeneratedToken, Token
from .prefix_cache import Prefill
from .validation import EngineError, Sampling

SIMULATED_MODEL = "simulated"


@dataclass(frozen=True)
class Timetable:
    ttft_s: float
    itl_s: float
    output_tokens: int


class SimulatedBackend:
    def __init__(
        self,
        timetable: Timetable,
        *,
        slots: int,
        prefill: Prefill | None = None,
        failure_rate: float = 0.0,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self._timetable = timetable
        self._failure_rate = failure_rate  # generations that fail, as a faulty engine's would
        self._draw = draw
        self.slots = slots
        self._prefill = prefill  # prompt-length-dependent prefill, with a prefix cache
        tokens = [Token(id=1000 + i % 100, text=f" w{i}", logprob=-0.5) for i in range(
            timetable.output_tokens)]  # fmt: skip
        self._plain = tuple(GeneratedToken(t, ()) for t in tokens)
        self._with_top = tuple(GeneratedToken(t, (t,)) for t in tokens)

    async def tokenize(self, text: str) -> list[tuple[int, str]]:
        """Whitespace-separated words; ids are stable hashes, as a vocabulary would give."""
        words = text.split(" ")
        pieces = [words[0], *(" " + w for w in words[1:])] if text else []
        return [(zlib.crc32(p.encode()) % 49152, p) for p in pieces if p]

    async def eos_token(self) -> Token:
        return Token(id=0, text="", logprob=None, special=True)

    async def apply_chat_template(self, messages: list[dict[str, Any]]) -> str:
        return "".join(f"<|{m.get('role')}|>{m.get('content') or ''}\n" for m in messages)

    async def generate(
        self, prompt: str, sampling: Sampling
    ) -> AsyncIterator[GeneratedToken | Finished]:
        table = self._timetable
        count = min(table.output_tokens, sampling.max_new_tokens)
        tokens = self._with_top if sampling.top_n_tokens else self._plain
        prefill_s = 0.0
        if self._prefill is not None:
            prefill_s = self._prefill.seconds([i for i, _ in await self.tokenize(prompt)])
        await asyncio.sleep(table.ttft_s + prefill_s)
        if self._failure_rate and self._draw() < self._failure_rate:
            raise EngineError(500, "generation", "simulated failure (--sim-failure-rate)")
        for i in range(count):
            if i:
                await asyncio.sleep(table.itl_s)
            yield tokens[i]
        reason = "length" if count == sampling.max_new_tokens else "eos_token"
        yield Finished(reason, count, 0)

    async def aclose(self) -> None:
        return None
