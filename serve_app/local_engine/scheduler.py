"""Admission, the waiting queue and TGI's metrics: the engine's view of load.

TGI refuses work past `--max-concurrent-requests` at once (429) and queues the rest until a batch
slot frees. The slots are modelled here with a semaphore in front of llama.cpp, so that
`tgi_queue_size` and `tgi_batch_current_size` are exact, and a queued request that is cancelled
never reaches the model.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric

from .backend import Backend, Finished, GeneratedToken, Token
from .validation import EngineError, Sampling, overloaded

LENGTH_BUCKETS = (1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class EngineMetrics:
    """TGI's metric names and types, in a registry of the engine's own (`exposition()` writes
    them as TGI does). TGI's batch internals (`tgi_batch_forward_duration` and the like) have
    no counterpart in llama.cpp and are left out."""

    def __init__(self, *, max_batch_total_tokens: int = 0) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_count = Counter("tgi_request_count", "Requests received", registry=r)
        self.request_success = Counter("tgi_request_success", "Requests served", registry=r)
        self.request_failure = Counter(
            "tgi_request_failure", "Requests failed", ["err"], registry=r
        )
        self.queue_size = Gauge("tgi_queue_size", "Requests waiting for a slot", registry=r)
        self.batch_current_size = Gauge(
            "tgi_batch_current_size", "Requests being decoded", registry=r
        )
        self.request_duration = Histogram(
            "tgi_request_duration", "End-to-end seconds", buckets=DURATION_BUCKETS, registry=r
        )
        self.validation_duration = Histogram(
            "tgi_request_validation_duration",
            "Seconds from arrival to the queue",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.max_new_tokens = Histogram(
            "tgi_request_max_new_tokens", "Tokens asked for", buckets=LENGTH_BUCKETS, registry=r
        )
        self.batch_max_total_tokens = Gauge(
            "tgi_batch_max_total_tokens", "Tokens all batch slots can hold", registry=r
        )
        self.batch_max_total_tokens.set(max_batch_total_tokens)
        self.queue_duration = Histogram(
            "tgi_request_queue_duration",
            "Seconds waiting for a slot",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "tgi_request_inference_duration",
            "Seconds in a slot",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.time_per_token = Histogram(
            "tgi_request_mean_time_per_token_duration",
            "Mean seconds per generated token",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.input_length = Histogram(
            "tgi_request_input_length", "Prompt tokens", buckets=LENGTH_BUCKETS, registry=r
        )
        self.generated_tokens = Histogram(
            "tgi_request_generated_tokens", "Generated tokens", buckets=LENGTH_BUCKETS, registry=r
        )
        # Not one of TGI's: every token generated, those of requests cut short included (TGI's
        # histogram above counts finished requests only), so billing can be checked against it.
        self.tokens_generated = Counter(
            "local_engine_tokens_generated", "Tokens generated, cut requests included", registry=r
        )


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus text, as TGI writes it: counters under their own names
    (prometheus-client would add `_total`) and no `_created` samples."""
    families = [f for f in registry.collect()]
    counters = [f for f in families if f.type == "counter"]
    others = _Families([f for f in families if f.type != "counter"])
    lines = []
    for family in counters:
        lines += [f"# HELP {family.name} {family.documentation}", f"# TYPE {family.name} counter"]
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(sample.labels.items()))
            lines.append(f"{family.name}{{{labels}}} {sample.value}" if labels
                         else f"{family.name} {sample.value}")  # fmt: skip
    text = generate_latest(others).decode()  # type: ignore[arg-type]
    kept = [line for line in text.splitlines() if not _is_created(line)]
    return ("\n".join(lines + kept) + "\n").encode()


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def _is_created(line: str) -> bool:
    name = line.split("{")[0].split(" ")[0] if not line.startswith("#") else line.split(" ")[2]
    return name.endswith("_created")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


@dataclass(frozen=True)
class Timing:
    """When an admitted request entered the queue, got a batch slot and finished (seconds on
    `time.perf_counter()`'s clock), for TGI's timing headers."""

    queued: float
    started: float
    done: float


@dataclass(frozen=True)
class StreamItem:
    """One generated token; the last one carries how generation ended, and when."""

    index: int
    token: Token
    top_tokens: tuple[Token, ...]
    finished: Finished | None = None
    timing: Timing | None = None


STOP_WINDOW = 300  # characters of recent output a stop sequence is matched against, as in TGI


def stop_matched(recent: str, stop: tuple[str, ...]) -> bool:
    """TGI's stop criterion: the text generated so far ends with a stop sequence."""
    return any(recent.endswith(s) for s in stop if s)


class Scheduler:
    def __init__(
        self,
        backend: Backend,
        *,
        max_concurrent_requests: int,
        eos: Token,
        max_batch_total_tokens: int = 0,
    ) -> None:
        self._backend = backend
        self._max_concurrent = max_concurrent_requests
        self._slots = asyncio.Semaphore(backend.slots)
        self._eos = eos
        self._in_flight = 0
        self._running = 0
        self.metrics = EngineMetrics(max_batch_total_tokens=max_batch_total_tokens)

    def admit(self) -> None:
        """Count a request in, or refuse it at once as TGI does past its concurrency limit."""
        if self._in_flight >= self._max_concurrent:
            self.metrics.request_failure.labels(err="overloaded").inc()
            raise overloaded()
        self._in_flight += 1
        self.metrics.request_count.inc()
        self._update_gauges()

    def release(self) -> None:
        self._in_flight -= 1
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.batch_current_size.set(self._running)
        self.metrics.queue_size.set(self._in_flight - self._running)

    async def stream(
        self, prompt: str, sampling: Sampling, input_length: int, received: float | None = None
    ) -> AsyncIterator[StreamItem]:
        """Generate for an admitted request (which arrived at `received`, on
        `time.perf_counter()`'s clock); the caller releases it afterwards."""
        m = self.metrics
        arrived = time.perf_counter()
        if received is not None:
            m.validation_duration.observe(arrived - received)
        m.max_new_tokens.observe(sampling.max_new_tokens)
        async with self._slots:
            started = time.perf_counter()
            self._running += 1
            self._update_gauges()
            try:
                count = 0
                async for item in self._items(prompt, sampling):
                    if item.index > count:
                        m.tokens_generated.inc(item.index - count)
                    count = item.index
                    if item.finished is not None:
                        done = time.perf_counter()
                        item = replace(item, timing=Timing(arrived, started, done))
                    yield item
            except EngineError as exc:
                m.request_failure.labels(err=exc.kind).inc()
                raise
            finally:
                self._running -= 1
                self._update_gauges()
        m.request_success.inc()
        m.request_duration.observe(done - arrived)
        m.queue_duration.observe(started - arrived)
        m.inference_duration.observe(done - started)
        m.input_length.observe(input_length)
        m.generated_tokens.observe(count)
        if count:
            m.time_per_token.observe((done - started) / count)

    async def _items(self, prompt: str, sampling: Sampling) -> AsyncIterator[StreamItem]:
        """Attach the finish to the last token, as TGI's stream does, checking after each
        token, in TGI's order: the length, then the stop sequences (the matched text stays in
        the answer). The end-of-sequence token is not streamed by llama.cpp; it is sent here,
        as TGI sends it. Returning early closes the generation, which frees its slot."""
        index = 0
        recent = ""
        generation = self._backend.generate(prompt, sampling)
        try:
            async for event in generation:
                if isinstance(event, GeneratedToken):
                    index += 1
                    item = StreamItem(index, event.token, event.top_tokens)
                    if index == sampling.max_new_tokens:
                        yield replace(item, finished=Finished("length", index, 0))
                        return
                    if sampling.stop:
                        recent = (recent + event.token.text)[-STOP_WINDOW:]
                        if stop_matched(recent, sampling.stop):
                            yield replace(item, finished=Finished("stop_sequence", index, 0))
                            return
                    yield item
                    continue
                if event.reason == "eos_token":
                    fin = replace(event, generated_tokens=index + 1)
                    yield StreamItem(index + 1, self._eos, (), fin)
                    return
                # No token to carry the end: llama.cpp streams no text for tokens that stop
                # inside an incomplete UTF-8 sequence. An empty special token carries it.
                count = max(index, event.generated_tokens)
                blank = Token(id=self._eos.id, text="", logprob=None, special=True)
                yield StreamItem(index + 1, blank, (), replace(event, generated_tokens=count))
                return
        finally:
            await generation.aclose()
