"""The router's route table, and the boundary where errors become HTTP answers.

Each request gets one `RequestLife` (`serve_app.router.lifecycle`), which owns it from its
arrival to its settlement; a generating route hands it the rest.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..config import AppConfig
from ..engine.client import reply_error
from ..errors import ModelNotFound
from ..tier.policy import TierPolicy
from ..tracing import Tracing
from .accounting import InFlight, Recorder
from .admission import admissions, report_queues
from .auth import key_ring
from .body import BodyLimits, tier_body_bytes
from .dispatch import Dispatcher, TierTransport
from .errors import api_error
from .grammar import GrammarCompiler
from .lifecycle import RequestLife, Services
from .prompt_tokens import PromptTokens
from .quota import LedgerCalls, Quotas
from .requests import parse_tokenize
from .shadow import Shadows
from .tier_states import TierBoard, TierState, TierStatus
from .versions import Versions, candidate_key, targets

Handler = Callable[[RequestLife], Awaitable[Response]]


def _admission(config: AppConfig, tier: str) -> Any:
    return next((t.admission for t in config.tiers if t.name == tier), None)


class Router:
    def __init__(
        self,
        config: AppConfig,
        transport: TierTransport,
        recorder: Recorder,
        ledger: LedgerCalls | None = None,
    ) -> None:
        """`transport` reaches the tiers and `ledger` the quota ledger: Serve handles in the
        deployment, in-process stand-ins in unit tests."""
        self._transport = transport
        self._ledger = ledger
        # every tier's state, kept up to date by the deployment's background watch
        # (`serve_app.router.tier_watch`); empty without one
        self.states = TierBoard()
        self._services = self._build(config, None, recorder)
        self._created = int(time.time())
        # the ingress settings this Ray cluster lacks (`serve_app.serve_env.missing_protections`)
        self.missing_guards: list[str] = []

    def reconfigure(self, config: AppConfig) -> None:
        """Apply `config` to the requests that arrive from now on; those under way finish
        with the services they began with. What carries state across requests is kept: the
        metrics and in-flight counts, tracing, the grammar workers, the keys (unless their
        section changed) and each admission queue (unless its tier's `admission` changed)."""
        self._services = self._build(config, self._services, self._services.recorder)

    def _build(self, config: AppConfig, previous: Services | None, recorder: Recorder) -> Services:
        keys = config.router.api_keys
        limits = config.router.tuning
        ledger = self._ledger
        quotas = (
            Quotas(ledger, keys.tuning.ledger_timeout_s, keys.on_ledger_failure)
            if keys is not None and ledger is not None
            else None
        )
        dispatch = Dispatcher(
            self._transport,
            {k: t.replica_wait_timeout_s for k, t in targets(config).items()},
            self.states,
        )
        tier_bytes = {
            t.name: tier_body_bytes(t.engine.max_input_tokens, limits.body_bytes_per_input_token)
            for t in config.tiers
        }
        queues = admissions(config)  # fair, prioritised queues of tiers that have one
        if previous is None:
            key_source = key_ring(keys)
            in_flight = InFlight(recorder)
            tracing = Tracing.configure(config.tracing, "router")
            grammars = GrammarCompiler()
            background: set[Any] = set()
            versions = Versions(config)
            shadows = Shadows(recorder, background)
        else:
            old = previous.config
            same_keys = old.router.api_keys == keys
            key_source = previous.keys if same_keys else key_ring(keys)
            for tier in config.tiers:
                kept = previous.admissions.get(tier.name)
                if kept is not None and _admission(old, tier.name) == tier.admission:
                    queues[tier.name] = kept
            if same_keys and previous.quotas is not None and quotas is not None:
                quotas = previous.quotas
            in_flight, tracing = previous.in_flight, previous.tracing
            grammars, background = previous.grammars, previous.background
            versions, shadows = previous.versions, previous.shadows
            versions.update(config)
        return Services(
            config=config,
            policy=TierPolicy(config),
            dispatch=dispatch,
            keys=key_source,
            quotas=quotas,
            admissions=queues,
            recorder=recorder,
            in_flight=in_flight,
            tracing=tracing,
            grammars=grammars,
            limits=BodyLimits(
                limits.max_body_bytes, limits.body_timeout_s, limits.max_json_depth, tier_bytes
            ),
            prompts=PromptTokens(
                dispatch,
                keys.tuning.tokenize_timeout_s if keys is not None else 2.0,
                {t.name: t.engine.protocol for t in config.tiers},
            ),
            background=background,
            versions=versions,
            shadows=shadows,
        )

    def rolled_back(self, key: str) -> None:
        """Another router replica rolled candidate `key` back (its board): its metric here too."""
        rollback = self._services.versions.rolled_back.get(key)
        if rollback is not None:
            tier, _, version = key.partition("@")
            self._services.recorder.rolled_back(tier, version, rollback.code)

    @property
    def services(self) -> Services:
        return self._services

    @property
    def in_flight(self) -> dict[str, int]:
        return dict(self._services.in_flight.by_tier)

    async def report_queues(self, router: str) -> None:
        """Forever: the admission queues' lengths to their tiers, as router replica `router`
        (a tier scales on them too: `serve_app.autoscaling`). Returns at once without queues."""
        services = self._services
        if services.admissions:

            async def send(tier: str, queued: int) -> None:
                await services.dispatch.report_queue(tier, router, queued)

            await report_queues(services.admissions, send)

    def asgi_app(self) -> Starlette:
        openai, tgi = self._openai, self._tgi
        return Starlette(
            routes=[
                Route("/v1/chat/completions", openai(self.chat_completions), methods=["POST"]),
                Route("/v1/completions", openai(self.completions), methods=["POST"]),
                Route("/v1/models", openai(self.list_models), methods=["GET"]),
                Route("/v1/models/{model:path}", openai(self.get_model), methods=["GET"]),
                Route("/v1/status", openai(self.status), methods=["GET"]),
                Route("/generate", tgi(self.generate), methods=["POST"]),
                Route("/generate_stream", tgi(self.generate_stream), methods=["POST"]),
                Route("/", tgi(self.compat_generate), methods=["POST"]),
                Route("/info", tgi(self.info), methods=["GET"]),
                Route("/tokenize", tgi(self.tokenize), methods=["POST"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/v1/versions", openai(self.versions), methods=["GET"]),
            ],
        )

    # -- OpenAI ---------------------------------------------------------------------------------

    async def chat_completions(self, life: RequestLife) -> Response:
        return await life.openai("chat")

    async def completions(self, life: RequestLife) -> Response:
        return await life.openai("completion")

    async def list_models(self, life: RequestLife) -> Response:
        names = self._services.policy.models_for(life.allowed)
        return JSONResponse({"object": "list", "data": [self._model_card(n) for n in names]})

    async def get_model(self, life: RequestLife) -> Response:
        name = life.request.path_params["model"]
        if name not in self._services.policy.models_for(life.allowed):
            raise ModelNotFound(f"The model {name!r} does not exist", param="model")
        return JSONResponse(self._model_card(name))

    def _model_card(self, name: str) -> dict[str, Any]:
        """OpenAI's model object, and the state of the tier that serves it (`status`, beside
        OpenAI's fields; none for `auto`)."""
        card = {"id": name, "object": "model", "created": self._created, "owned_by": "serve-app"}
        tier = self._services.policy.tier_of(name)
        if tier is not None:
            card["status"] = self._tier_status(tier).summary()
        return card

    def _tier_status(self, tier: str) -> TierStatus:
        status = self.states.get(tier)
        return status if status is not None else TierStatus(tier, TierState.UNKNOWN, self._created)

    async def status(self, life: RequestLife) -> Response:
        """Every tier the caller may use: its state, since when, why, its replicas and their
        start-up phases (`serve_app.router.tier_states`)."""
        tiers = [t.name for t in self._services.config.tiers]
        if life.allowed is not None:
            tiers = [t for t in tiers if t in life.allowed]
        versions = self._services.versions.state()["tiers"]
        entries = [
            {**self._tier_status(t).as_json(), "versions": self._versions(t, versions.get(t))}
            for t in tiers
        ]
        return JSONResponse({"object": "status", "time": time.time(), "tiers": entries})

    def _versions(self, tier: str, versions: dict[str, Any] | None) -> dict[str, Any] | None:
        """The tier's versions (`Versions.state`), its candidate with its own state."""
        if versions is None or versions.get("candidate") is None:
            return versions
        candidate = versions["candidate"]
        status = self._tier_status(candidate_key(tier, candidate["version"])).as_json()
        state = {k: status[k] for k in ("state", "since", "reason") if k in status}
        return {**versions, "candidate": {**candidate, **state}}

    # -- TGI native ----------------------------------------------------------------------------

    async def generate(self, life: RequestLife) -> Response:
        return await life.tgi_generate("/generate")

    async def generate_stream(self, life: RequestLife) -> Response:
        return await life.tgi_generate("/generate_stream")

    async def compat_generate(self, life: RequestLife) -> Response:
        return await life.tgi_generate("/")

    async def info(self, life: RequestLife) -> Response:
        choice = self._services.policy.for_header(life.request.headers.get("x-tier"))
        if life.tenant is not None:
            life.tenant.check_tier(choice.tier)
        info = await self._services.dispatch.info(choice.tier)
        return JSONResponse(info, headers={"x-tier": choice.tier, "x-tier-reason": choice.reason})

    async def tokenize(self, life: RequestLife) -> Response:
        """TGI's `/tokenize` on the tier `X-Tier` names: no generation, so neither admitted
        nor charged; the key must still be allowed the tier."""
        request, services = life.request, self._services
        parsed = parse_tokenize(await life.read())
        choice = services.policy.for_header(request.headers.get("x-tier"))
        if life.tenant is not None:
            life.tenant.check_tier(choice.tier)
        call = parsed.call(services.config.tier(choice.tier))
        reply = await services.dispatch.request(choice.tier, call, life.trace)
        if reply.status != 200:
            raise reply_error(reply.status, reply.body)
        headers = {"x-tier": choice.tier, "x-tier-reason": choice.reason}
        return Response(reply.body, media_type="application/json", headers=headers)

    async def health(self, request: Request) -> Response:
        """Up; on a Ray cluster started without the stack's ingress settings, their names."""
        if self.missing_guards:
            return JSONResponse({"status": "ok", "ingress_guards_missing": self.missing_guards})
        return JSONResponse({"status": "ok"})

    async def versions(self, life: RequestLife) -> Response:
        """Every tier's versions as this router replica applies them: weights, the candidate's
        health over its rollback window, a rollback and why (`Versions.state`); with keys on,
        the tiers the key may use."""
        state = self._services.versions.state()
        if life.allowed is not None:
            state["tiers"] = {t: v for t, v in state["tiers"].items() if t in life.allowed}
        return JSONResponse(state)

    # -- the boundary: a request's life begins, errors become HTTP answers ---------------------

    def _guarded(self, handler: Handler, *, tgi: bool) -> Callable[[Request], Awaitable[Response]]:
        async def route(request: Request) -> Response:
            services = self._services  # as configured when the request arrived
            life = RequestLife(services, request, tgi=tgi)
            try:
                life.identify()
                return life.finish(await handler(life))
            except Exception as exc:
                life.failed(exc)
                error = api_error(exc)
                if life.tenant is not None and error.status in (403, 429):
                    services.recorder.tenant_rejection(life.tenant.name, error.code or "")
                return life.finish(error.response(tgi=tgi))
            except BaseException as exc:  # cancelled: the client went away
                life.failed(exc)
                raise

        return route

    def _openai(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        return self._guarded(handler, tgi=False)

    def _tgi(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        return self._guarded(handler, tgi=True)
