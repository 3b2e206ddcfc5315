"""Where a request is admitted and accounted: one `RequestLife` per generating request.

    identify   the headers' size and the API key → the tenant          (`identify`)
    read       the body within bounds → a typed request                (`openai`, `tgi`)
    choose     the tier (model name, `auto` rules, X-Tier, spill-over)
    admit      the key may use the tier, its quota holds the call, its turn in the tier's
               admission queue; from here it counts in flight          (`admit`)
    run        the call to the tier, a whole answer or a stream
    settle     once, however it ended (answered, failed, timed out, client gone, cancelled):
               outcome and tokens recorded, out of flight, the turn left with the tokens
               used, the quota reservation settled, the span ended     (`settle`)

Everything a stage needs is an attribute of the object: nothing travels in `request.state`
or context variables. A streamed answer settles when its last byte is sent or the client cuts
it (`LifeStream`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ray.serve.context import _get_serve_request_context
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from ..config import AppConfig
from ..engine.client import reply_error
from ..engine.sse import Batch
from ..errors import HeadersTooLarge
from ..tier.call import EngineRoute, TierCall
from ..tier.policy import TierChoice, TierPolicy
from ..tracing import RequestTrace, Tracing
from . import usage_log
from .accounting import CLIENT_CLOSED, InFlight, Recorder, Usage, prompt_estimate, usage_from
from .admission import ANONYMOUS, priority
from .auth import Authenticator, KeyedCalls, Tenant
from .body import BodyLimits, read_json
from .dispatch import Calls, Dispatcher, moved
from .errors import api_error, rate_limit_headers
from .fair_queue import Admission, Ticket
from .grammar import GrammarCompiler, Grammars
from .openai import Normaliser
from .prompt_tokens import PromptTokens
from .quota import Quotas, Reservation
from .requests import GenerateRequest, Kind, OpenAIRequest, parse_generate, parse_openai
from .shadow import Outcome, ShadowCopy, Shadows, answer_text, shadow_call, sse_text, tapped
from .sse import Tally, openai_events, tgi_events
from .tgi import reply_usage
from .versions import SERVED_HEADER, Target, Versions, session_of

logger = logging.getLogger("ray.serve")
WAIT_HEADER = "x-admission-wait-ms"  # how long the request waited for its turn


@dataclass(frozen=True)
class Services:
    """What every request's life uses, built once per router replica."""

    config: AppConfig
    policy: TierPolicy
    dispatch: Dispatcher
    keys: Authenticator | None
    quotas: Quotas | None
    admissions: Mapping[str, Admission]
    recorder: Recorder
    in_flight: InFlight
    tracing: Tracing
    limits: BodyLimits
    grammars: GrammarCompiler  # grammars compiled off the loop, with a deadline
    prompts: PromptTokens  # prompts counted by the tier's engine, for token quotas
    background: set[asyncio.Future[None]]  # quota settlements under way
    versions: Versions  # each tier's stable and candidate versions (`serve_app.router.versions`)
    shadows: Shadows  # copies of stable requests to candidates (`serve_app.router.shadow`)


class RequestLife:
    """One request, from its arrival to its settlement."""

    def __init__(self, services: Services, request: Request, *, tgi: bool) -> None:
        self._s = services
        self.request = request
        self.tgi = tgi  # statuses and error bodies as TGI's routes give them
        self.trace: RequestTrace = services.tracing.start(request)
        self.tenant: Tenant | None = None
        self.model: str | None = None  # the model name asked for
        self.chosen: str | None = None  # the tier chosen, admitted or not
        self.tier: str | None = None  # once admitted
        self.target: Target | None = None  # the version that serves it, once chosen
        self._parsed: OpenAIRequest | GenerateRequest | None = None
        self._shadow: ShadowCopy | None = None  # this request's copy to the candidate
        self._answer_text: str | None = None  # a whole answer's, for the copy's comparison
        self._streamed_bytes: bytearray | None = None  # a shadowed stream's, the same
        self.status = 200
        self.answer_headers: dict[str, str] = {}
        self._reservation: Reservation | None = None
        self._turn: tuple[Admission, Ticket] | None = None
        self._prompt_tokens = 0  # counted by the engine for a token quota, else estimated
        self._arrived = time.perf_counter()
        self._start = self._last = 0.0
        self._first: float | None = None
        self._gaps = 0  # gaps between a stream's writes with tokens, after the first
        self._usage: Usage | None = None
        self._sent = False  # the call went to the tier: the engine may be reading the prompt
        self._tally: Tally | None = None  # a streamed answer's
        self._settled = False

    # -- identify ------------------------------------------------------------------------------

    def identify(self) -> None:
        """The caller's tenant (none with keys off); raises on oversized headers or a bad key."""
        limit = self._s.config.router.tuning.max_header_bytes
        size = sum(len(name) + len(value) for name, value in self.request.scope["headers"])
        if size > limit:
            raise HeadersTooLarge(
                f"the request headers are {size} bytes, over the limit of {limit}"
            )
        if self._s.keys is not None:
            self.tenant = self._s.keys.authenticate(self.request.headers)

    @property
    def allowed(self) -> frozenset[str] | None:
        """The tiers the key may use (None: all)."""
        return None if self.tenant is None else self.tenant.tiers

    # -- the two protocols ---------------------------------------------------------------------

    async def openai(self, kind: Kind) -> Response:
        parsed = parse_openai(kind, await self.read(), self._s.config.router.tuning)
        self.model = parsed.model
        self.trace.set(parsed.attributes())
        headers = {k.lower(): v for k, v in self.request.headers.items()}
        choice = self._s.policy.for_model(
            parsed.model, parsed.traits(headers), self._s.in_flight.by_tier, self.allowed
        )
        self.chosen = choice.tier
        if choice.spilled_from:
            self._s.recorder.spill_over(choice.spilled_from, choice.tier)
        call = await self._call(parsed, parsed.grammars, choice)
        normaliser = Normaliser(parsed)
        await self.admit(choice, call)
        self._start_shadow()
        if not call.stream:
            try:
                self._sent = True
                reply = await self._request(call)
                if reply.status != 200:
                    raise reply_error(reply.status, reply.body)
                self._chunk()  # a whole answer's first token comes with its last
                answer = normaliser.complete(json.loads(reply.body))
                self.report(usage_from(answer))
                if self._shadow is not None:
                    self._answer_text = answer_text(answer)
            except BaseException as exc:
                self.settle(exc)
                raise
            self.settle()
            return JSONResponse(answer, headers=self.answer_headers)
        first, chunks = await self._stream(call)
        tally = Tally()
        return self._streamed(openai_events(normaliser, tally, first, chunks), tally, chunks)

    async def tgi_generate(self, route: EngineRoute) -> Response:
        """TGI's routes: bodies and answers pass through unchanged but for the tier's limits."""
        parsed = parse_generate(route, await self.read(), self._s.config.router.tuning)
        self.trace.set(parsed.attributes())
        choice = self._s.policy.for_header(self.request.headers.get("x-tier"))
        self.chosen = choice.tier
        call = await self._call(parsed, parsed.grammars, choice)
        await self.admit(choice, call)
        self._start_shadow()
        if not call.stream:
            try:
                self._sent = True
                reply = await self._request(call)
                self.status = reply.status
                if reply.status == 200:
                    self._chunk()  # a whole answer's first token comes with its last
                    self.report(reply_usage(reply, self._prompt_tokens))
                    if self._shadow is not None:
                        self._answer_text = answer_text(json.loads(reply.body))
            except BaseException as exc:
                self.settle(exc)
                raise
            self.settle()
            headers = {**dict(reply.headers), **self.answer_headers}
            return Response(
                reply.body, reply.status, media_type="application/json", headers=headers
            )
        first, chunks = await self._stream(call)
        tally = Tally()
        return self._streamed(tgi_events(tally, first, chunks), tally, chunks)

    async def _call(self, parsed: OpenAIRequest | GenerateRequest, grammars: Grammars,
                    choice: TierChoice) -> TierCall:  # fmt: skip
        """The tier's call, its grammars within the tier's policy (`serve_app.router.grammar`)."""
        tier = self._s.config.tier(choice.tier)
        self._parsed = parsed
        self.target = self._version(choice.tier, parsed)
        call = parsed.call(self.target.config)
        if grammars:
            if self.tenant is not None:
                self.tenant.check_tier(tier.name)  # nothing is compiled for a key that may not
            policy = tier.tuning.grammar
            await self._s.grammars.check(grammars.checked(policy), policy.check_timeout_s)
        return call

    def _version(self, tier: str, parsed: OpenAIRequest | GenerateRequest) -> Target:
        """The version of `tier` that serves the request (`serve_app.router.versions`): the
        candidate for a share of the sessions, else the stable one."""
        user = parsed.passthrough.get("user") if isinstance(parsed, OpenAIRequest) else None
        tenant = self.tenant
        session = session_of(self.request.headers, user, tenant.key_sha256 if tenant else None)
        return self._s.versions.pick(tier, session)

    def _start_shadow(self) -> None:
        """A copy of a stable-served request to the tier's candidate, if this one is drawn
        (`serve_app.router.shadow`): in the background, never billed, never waited for."""
        target, parsed, services = self.target, self._parsed, self._s
        candidate = services.versions.shadow(target) if target is not None else None
        if candidate is None or parsed is None:
            return
        try:
            call = shadow_call(parsed, candidate)
        except Exception:  # a request the candidate's engine could not take as a whole answer
            return
        dispatch = services.dispatch

        def send(key: str, shadowed: TierCall) -> Any:
            return dispatch.request(key, shadowed, RequestTrace())

        timeout_s = candidate.config.request_timeout_s
        self._shadow = services.shadows.start(candidate, call, send, services.versions, timeout_s)

    def _serve_as(self, target: Target) -> None:
        self.target = target
        self.answer_headers[SERVED_HEADER] = target.version
        self.trace.set({"serve_app.version": target.version})

    async def read(self) -> dict[str, Any]:
        """The body, for a key that may send one now: a key over its requests per minute is
        refused unread, and no body is read past what the tiers the key may use could take."""
        request, limits = self.request, self._s.limits
        if self.tenant is not None and self._s.quotas is not None:
            self._s.quotas.check_open(self.tenant)
        return await read_json(
            request.stream(),
            request.headers.get("content-length"),
            limits,
            limits.max_bytes_for(self.allowed),
        )

    # -- admit ---------------------------------------------------------------------------------

    async def admit(self, choice: TierChoice, call: TierCall) -> None:
        """The key may use the tier, its quota holds the call, and (if the tier queues) its
        turn has come. From here on the request counts in flight and must be settled."""
        tenant, tier = self.tenant, choice.tier
        self.trace.tier(self._s.config.tier(tier), tenant.name if tenant else None)
        self.answer_headers = {"x-tier": tier, "x-tier-reason": choice.reason}
        if self.target is not None:
            self._serve_as(self.target)
        prompt_tokens = prompt_estimate(call.prompt_chars)
        if tenant is not None:
            tenant.check_tier(tier)
            reserved = call.token_estimate
            if self._s.quotas is not None and tenant.tokens_per_minute:
                prompt_tokens = await self._s.prompts.count(tier, call)
                reserved = prompt_tokens + call.max_tokens
                self.trace.set({"serve_app.prompt_tokens_reserved": prompt_tokens})
            if self._s.quotas is not None:
                self._reservation = await self._s.quotas.reserve(tenant, reserved)
            self._s.recorder.tenant_request(tenant.name, tier)
        admission = self._s.admissions.get(tier)
        if admission is not None:
            try:
                ticket = await admission.enter(
                    tenant.name if tenant is not None else ANONYMOUS,
                    priority(tenant, self.request.headers.get("x-priority")),
                    call.token_estimate,
                    tenant.weight if tenant is not None else 1.0,
                )
            except BaseException:
                self._settle_quota(Usage(0, 0))
                raise
            self._turn = (admission, ticket)
        self.trace.admitted()
        if self._reservation is not None:
            self.answer_headers.update(rate_limit_headers(self._reservation.limits))
        self.tier = tier
        self._prompt_tokens = prompt_tokens
        self._start = self._last = time.perf_counter()
        self._s.in_flight.add(tier, +1)
        self.trace.hold()  # the span ends once the request has settled

    # -- run -----------------------------------------------------------------------------------

    async def _request(self, call: TierCall) -> Any:
        """The whole answer, from the chosen version or (`_other`) the other one."""
        assert self.target is not None
        try:
            return await self._s.dispatch.request(self.target.key, call, self.trace)
        except Exception as exc:
            call = self._other(exc)
        assert self.target is not None
        return await self._s.dispatch.request(self.target.key, call, self.trace)

    def _other(self, exc: Exception) -> TierCall:
        """A version that could not take the request (its application is going away, say):
        the call for the tier's other version, which serves it from here; else `exc` again."""
        other = self._s.versions.other(self.target) if self.target is not None else None
        if other is None or self._parsed is None or not moved(exc):
            raise exc
        self._serve_as(other)
        return self._parsed.call(other.config)

    async def _stream(self, call: TierCall) -> tuple[Batch | None, Calls[Batch | None]]:
        """Start a stream, on the chosen version or (`_other`) the other one; a failure before
        its first chunk settles here. A keyed stream ends with an error event once its key is
        revoked (`KeyedCalls`)."""
        assert self.target is not None
        dispatch = self._s.dispatch
        try:
            self._sent = True
            try:
                first, chunks = await dispatch.stream(self.target.key, call, self.trace)
            except Exception as exc:
                call = self._other(exc)
                first, chunks = await dispatch.stream(self.target.key, call, self.trace)
        except BaseException as exc:
            self.settle(exc)
            raise
        keys, tenant = self._s.keys, self.tenant
        if keys is not None and tenant is not None:
            return first, KeyedCalls(chunks, keys, tenant)
        return first, chunks

    def _streamed(
        self, events: AsyncIterator[bytes], tally: Tally, calls: Calls[Batch | None]
    ) -> Response:
        """The streamed answer; should it fail to build, the stream is cancelled and the
        request settled here, since no answer will ever run to do it. Its writes are timed
        through the tally (`_chunk`), with nothing more per chunk."""
        self._tally = tally
        tally.on_batch = self._chunk
        if self._shadow is not None:  # the text it carries, for the copy's comparison
            self._streamed_bytes = bytearray()
            events = tapped(events, self._streamed_bytes)
        try:
            return LifeStream(events, self, calls, self.answer_headers)
        except BaseException as exc:
            calls.cancel()
            self.settle(exc)
            raise

    def _chunk(self) -> None:
        """A write with tokens goes out: the first token's time is recorded at once, the gaps
        after it once the request settles (`_record_gaps`)."""
        now = time.perf_counter()
        if self._first is None:
            assert self.tier is not None
            self._first = now
            self._s.recorder.first_token(self.tier, now - self._start, self.version)
            self.trace.first_token()
        else:
            self._gaps += 1
        self._last = now

    def _record_gaps(self, tier: str) -> None:
        """A stream's inter-token latency, one observation per request: the mean gap between
        its writes with tokens after the first."""
        if self._gaps and self._first is not None:
            gap = (self._last - self._first) / self._gaps
            self._s.recorder.between_tokens(tier, gap, self.version)

    def report(self, usage: Usage | None) -> None:
        """The engine's own count, which wins over the counted chunks."""
        if usage is not None:
            self._usage = usage

    @property
    def usage(self) -> Usage:
        """The engine's own count, else the tokens a stream carried. A request the client
        left once it was sent to the tier is charged its prompt (and what its stream carried),
        even before the first token: the engine read the prompt."""
        tally = self._tally
        if tally is not None and tally.usage is not None:
            return tally.usage
        if self._usage is not None:
            return self._usage
        if tally is not None:
            return Usage(self._prompt_tokens, tally.tokens)
        if self._sent and self.status == CLIENT_CLOSED:
            return Usage(self._prompt_tokens, 0)
        return Usage(0, 0)

    # -- settle --------------------------------------------------------------------------------

    def settle(self, exc: BaseException | None = None) -> None:
        """Record the outcome once, whatever the exit; never raises. A request that was never
        admitted has nothing to settle."""
        if self._settled or self.tier is None:
            return
        self._settled = True
        tally = self._tally
        if tally is not None and tally.status is not None:
            self.status = tally.status  # an error event inside the stream
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit, ClientDisconnect)):
            self.status = CLIENT_CLOSED
        elif exc is not None:
            error = api_error(exc)
            self.status = error.tgi_status() if self.tgi else error.status
        usage, tier = self.usage, self.tier
        # Each part on its own: one that fails (a metric, say) must not keep the others from
        # happening, nor turn an answer into an error.
        with _logged():
            self._s.in_flight.add(tier, -1)
        seconds = time.perf_counter() - self._start
        with _logged():
            self._s.recorder.finished(tier, self.status, seconds, usage, self.version)
        with _logged():
            self._judge(seconds)
        if self._shadow is not None:
            with _logged():
                self._shadow.settled(self._outcome(seconds, usage))
        with _logged():
            self._record_gaps(tier)
        if tally is not None:
            with _logged():
                self.trace.set({"serve_app.stream_chunks": tally.writes})
        with _logged():
            self.trace.usage(
                {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
            )
        if self._turn is not None:
            admission, ticket = self._turn
            with _logged():
                admission.leave(ticket, usage.total)
        if self.tenant is not None:
            with _logged():
                self._s.recorder.tenant_tokens(self.tenant.name, tier, usage.total, self.feature)
        with _logged():
            self._settle_quota(usage)
        with _logged():
            self._write_usage(usage)
        self.trace.release()

    @property
    def version(self) -> str:
        """The version that served the request, as metrics name it."""
        return self.target.version if self.target is not None else "none"

    def _outcome(self, seconds: float, usage: Usage) -> Outcome:
        """This (stable) answer, for its shadow copy's comparison."""
        text = self._answer_text
        if self._streamed_bytes is not None:
            text = sse_text(bytes(self._streamed_bytes))
        return Outcome(self.status, seconds, usage.completion_tokens, text)

    def _judge(self, seconds: float) -> None:
        """A candidate's outcome into its rollback window: its duration, or for a stream its
        time to the first token (`serve_app.router.versions`)."""
        target = self.target
        if target is None or not target.candidate:
            return
        if self._tally is not None and self._first is not None:
            seconds = self._first - self._start
        rollback = self._s.versions.observe(target.key, self.status, seconds)
        if rollback is not None:
            self._s.recorder.rolled_back(target.tier, target.version, rollback.code)

    def _settle_quota(self, usage: Usage) -> None:
        """Settle the reservation with the tokens used, in the background: the request may be
        ending by cancellation, where nothing more can be awaited."""
        reservation, quotas = self._reservation, self._s.quotas
        if reservation is None or quotas is None:
            return
        self._reservation = None
        task = asyncio.ensure_future(quotas.settle(reservation, usage.total))
        self._s.background.add(task)
        task.add_done_callback(self._s.background.discard)

    def streamed(self, error: BaseException | None) -> None:
        """The streamed answer is over: sent to its end, failed, or cut by the client (a
        stream that did not reach its end without an error counts as the client's leaving)."""
        tally = self._tally
        if error is None and tally is not None and not tally.ended and tally.status is None:
            self.status = CLIENT_CLOSED
        self.settle(error)

    def finish(self, response: Response) -> Response:
        """The answer as sent: its span, the version that served it (an error's too), and how
        long the request waited for its turn."""
        response = self.trace.finish(response)
        target = self.target
        if self.tier is not None and target is not None and SERVED_HEADER not in response.headers:
            response.headers[SERVED_HEADER] = target.version  # an error answer's too
        if self._turn is not None:
            waited_ms = round(self._turn[1].waited_s * 1000)
            response.raw_headers.append((WAIT_HEADER.encode(), str(waited_ms).encode()))
        return response

    def failed(self, exc: BaseException) -> None:
        """The request ends with an exception: settled with it, or (never admitted) counted as
        refused; a cancellation (the client went away before its answer) also ends the span."""
        if self.tier is None:
            self._refused(exc)
        else:
            self.settle(exc)
        if not isinstance(exc, Exception):
            self.trace.abandon()

    def _refused(self, exc: BaseException) -> None:
        """A request that ended before admission: counted under the tier it asked for (`none`
        before one was chosen), so that every request is on the dashboards and in the log."""
        if self._settled:
            return
        self._settled = True
        if isinstance(exc, Exception):
            error = api_error(exc)
            self.status = error.tgi_status() if self.tgi else error.status
        else:
            self.status = CLIENT_CLOSED
        with _logged():
            self._s.recorder.refused(self.chosen or "none", self.status)
        with _logged():
            self._write_usage(Usage(0, 0))

    @property
    def feature(self) -> str | None:
        """What the caller says the request is for (`x-feature`), if a plain name."""
        return usage_log.feature(self.request.headers.get(usage_log.FEATURE_HEADER))

    def _write_usage(self, usage: Usage) -> None:
        """The request's line in the usage log (`serve_app.router.usage_log`)."""
        tenant, headers, now = self.tenant, self.request.headers, time.perf_counter()
        usage_log.write(
            usage_log.UsageRecord(
                time=usage_log.now(),
                request_id=headers.get("x-request-id") or request_id(),
                key_id=usage_log.key_id(tenant.key_sha256) if tenant is not None else None,
                tenant=tenant.name if tenant is not None else None,
                feature=self.feature,
                route=self.request.url.path,
                model=self.model,
                tier=self.tier or self.chosen,
                status=self.status,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                ttft_s=None if self._first is None else round(self._first - self._start, 6),
                duration_s=round(now - self._arrived, 6),
            )
        )


def request_id() -> str | None:
    """The id Serve's proxy gave the request (the answer's `x-request-id`)."""
    return _get_serve_request_context().request_id or None


@contextlib.contextmanager
def _logged() -> Iterator[None]:
    try:
        yield
    except Exception:
        logger.exception("request accounting failed")


class LifeStream(StreamingResponse):
    """An SSE answer that settles its request and cancels the tier's stream however it ends:
    done, failed, or cut by the client before or during the stream."""

    def __init__(
        self,
        events: AsyncIterator[bytes],
        life: RequestLife,
        calls: Calls[Batch | None],
        headers: Mapping[str, str],
    ) -> None:
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self._life = life
        self._calls = calls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        error: BaseException | None = None
        try:
            await super().__call__(scope, receive, send)
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._calls.cancel()  # a client that went away stops the engine's generation too
            self._life.streamed(error)
