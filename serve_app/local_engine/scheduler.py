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

from .backend import Backend, Finished, GeneratedToken, Token
from .validation import EngineError, Sampling, overloaded

LENGTH_BUCKETS = (1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class EngineMetrics:
    """TGI's metric names, in a registry of the engine's own."""

    def __init__(self) -> None:
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
    def __init__(self, backend: Backend, *, max_concurrent_requests: int, eos: Token) -> None:
        self._backend = backend
        self._max_concurrent = max_concurrent_requests
        self._slots = asyncio.Semaphore(backend.slots)
        self._eos = eos
        self._in_flight = 0
        self._running = 0
        self.metrics = EngineMetrics()

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
        self, prompt: str, sampling: Sampling, input_length: int
    ) -> AsyncIterator[StreamItem]:
        """Generate for an admitted request; the caller releases it afterwards."""
        m = self.metrics
        arrived = time.perf_counter()
        async with self._slots:
            started = time.perf_counter()
            self._running += 1
            self._update_gauges()
            try:
                count = 0
                async for item in self._items(prompt, sampling):
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
