"""The one table from errors to HTTP: OpenAI's error shape on /v1, TGI's on TGI's routes.

Each error has one status whatever the route, with two exceptions that follow each protocol: a
request the engine or the router finds invalid is a 400 `invalid_request_error` on the OpenAI
routes and TGI's 422 `validation` on TGI's routes (TGI's own client raises `ValidationError` for
it). On TGI's routes `error_type` uses TGI's words: `validation`, `overloaded`, `generation`,
`incomplete_generation`.

Only the project's own errors (`serve_app.errors`) are here: foreign ones are translated where
they arise (the engine client's `engine_errors`, the Serve transport's `ray_errors`). Ray wraps
exceptions raised in tier replicas (`RayTaskError` subclasses the original), so the same
`isinstance` checks hold for errors from this process and from a replica. Anything else is the
router's own fault: logged, and a 500.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse

from ..errors import (
    AdmissionRefused,
    EngineReplyError,
    EngineUnavailable,
    Forbidden,
    HeadersTooLarge,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    QuotaExceeded,
    QuotaUnavailable,
    RateLimit,
    ReplicaUnavailable,
    RequestError,
    RequestTimeout,
    TierOverloaded,
    TierUnavailable,
    Unauthorized,
)

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class APIError:
    status: int
    message: str
    type: str
    code: str | None = None
    param: str | None = None
    retry_after_s: int | None = None
    tgi_type: str | None = None  # TGI's `error_type`, when it differs from the default below
    limits: tuple[RateLimit, ...] = ()
    engine_status: int | None = None  # an engine's refusal keeps its status on TGI's routes

    def openai_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def tgi_status(self) -> int:
        if self.engine_status is not None:
            return self.engine_status
        return 422 if self.type == "invalid_request_error" and self.status == 400 else self.status

    def tgi_body(self) -> dict[str, Any]:
        return {"error": self.message, "error_type": self.tgi_type or _tgi_type(self.tgi_status())}

    def headers(self) -> dict[str, str]:
        headers = rate_limit_headers(self.limits)
        if self.retry_after_s:
            headers["Retry-After"] = str(self.retry_after_s)
        return headers

    def response(self, *, tgi: bool = False) -> JSONResponse:
        if tgi:
            return JSONResponse(self.tgi_body(), self.tgi_status(), headers=self.headers())
        return JSONResponse(self.openai_body(), self.status, headers=self.headers())


def _tgi_type(status: int) -> str:
    if status in (429, 503):
        return "overloaded"
    return "validation" if status < 500 else "generation"


def rate_limit_headers(limits: tuple[RateLimit, ...]) -> dict[str, str]:
    """OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`."""
    headers = {}
    for limit in limits:
        headers[f"x-ratelimit-limit-{limit.kind}"] = str(limit.limit)
        headers[f"x-ratelimit-remaining-{limit.kind}"] = str(limit.remaining)
        headers[f"x-ratelimit-reset-{limit.kind}"] = _duration(limit.reset_s)
    return headers


def _duration(seconds: float) -> str:
    """OpenAI's form: `1s`, `6m0s`, `120ms`."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    whole = math.ceil(seconds)
    return f"{whole // 60}m{whole % 60}s" if whole >= 60 else f"{whole}s"


def _engine_reply(exc: EngineReplyError) -> APIError:
    if exc.status in (400, 413, 422):
        return APIError(400, exc.message, "invalid_request_error", exc.error_type or None,
                        tgi_type=exc.error_type or None, engine_status=exc.status)  # fmt: skip
    if exc.status == 429:
        return APIError(
            429, f"the engine is at capacity: {exc.message}", "server_overloaded",
            "engine_overloaded", retry_after_s=1, tgi_type="overloaded",
        )  # fmt: skip
    if exc.status == 424:
        return APIError(500, f"the engine failed to generate: {exc.message}", "server_error",
                        "generation_error", tgi_type="generation")  # fmt: skip
    return APIError(502, f"the engine answered {exc.status}: {exc.message}", "server_error",
                    "engine_error", tgi_type=exc.error_type or "generation")  # fmt: skip


def api_error(exc: BaseException) -> APIError:
    """Classify any exception that reached a route; unknown ones are the router's own fault."""
    if isinstance(exc, ModelNotFound):
        return APIError(404, exc.message, "invalid_request_error", "model_not_found", exc.param)
    if isinstance(exc, Unauthorized):
        return APIError(401, exc.message, "invalid_request_error", "invalid_api_key")
    if isinstance(exc, Forbidden):
        return APIError(403, exc.message, "invalid_request_error", "tier_not_allowed", exc.param)
    if isinstance(exc, QuotaExceeded) and exc.kind == "budget":
        return APIError(429, exc.message, "insufficient_quota", "insufficient_quota",
                        retry_after_s=int(exc.retry_after_s))  # fmt: skip
    if isinstance(exc, QuotaExceeded):
        code = "rate_limit_exceeded" if exc.kind == "requests" else "tokens_exceeded"
        return APIError(429, exc.message, exc.kind, code, retry_after_s=int(exc.retry_after_s),
                        limits=exc.limits)  # fmt: skip
    if isinstance(exc, PayloadTooLarge):
        return APIError(413, exc.message, "invalid_request_error", "payload_too_large")
    if isinstance(exc, HeadersTooLarge):
        return APIError(431, exc.message, "invalid_request_error", "headers_too_large")
    if isinstance(exc, RequestTimeout):
        return APIError(408, exc.message, "invalid_request_error", "request_timeout")
    if isinstance(exc, (InvalidRequest, RequestError)):
        return APIError(400, exc.message, "invalid_request_error", None, exc.param)
    if isinstance(exc, EngineReplyError):
        return _engine_reply(exc)
    if isinstance(exc, AdmissionRefused):
        return APIError(429, exc.message, "server_overloaded", "tier_queue_full",
                        retry_after_s=exc.retry_after_s)  # fmt: skip
    if isinstance(exc, EngineUnavailable):
        return APIError(503, f"the engine is unavailable: {exc.message}", "server_error",
                        "engine_unavailable", retry_after_s=2)  # fmt: skip
    if isinstance(exc, TierUnavailable):
        return APIError(503, exc.message, "server_error", "tier_unavailable",
                        retry_after_s=exc.retry_after_s)  # fmt: skip
    if isinstance(exc, QuotaUnavailable):
        return APIError(503, exc.message, "server_error", "quota_unavailable", retry_after_s=2)
    if isinstance(exc, ReplicaUnavailable):
        return APIError(503, exc.message, "server_error", "replica_unavailable", retry_after_s=2)
    if isinstance(exc, TierOverloaded):
        return APIError(429, exc.message, "server_overloaded", "tier_overloaded", retry_after_s=1)
    logger.error("router error", exc_info=exc)
    return APIError(500, f"the router failed: {type(exc).__name__}", "server_error", "router_error")
