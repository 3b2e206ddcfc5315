"""The one table from errors to HTTP: OpenAI's error shape on /v1, TGI's on TGI's routes.

Ray wraps exceptions raised in tier replicas (`RayTaskError` subclasses the original), so the
same `isinstance` checks hold for errors from this process and from a replica.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.responses import JSONResponse

from ..errors import (
    AdmissionRefused,
    EngineReplyError,
    EngineUnavailable,
    Forbidden,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    QuotaExceeded,
    RequestError,
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

    def openai_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def tgi_body(self) -> dict[str, Any]:
        return {"error": self.message, "error_type": self.code or self.type}

    def response(self, *, tgi: bool = False) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after_s)} if self.retry_after_s else None
        body = self.tgi_body() if tgi else self.openai_body()
        return JSONResponse(body, status_code=self.status, headers=headers)


def _engine_reply(exc: EngineReplyError) -> APIError:
    if exc.status in (400, 413, 422):
        return APIError(400, exc.message, "invalid_request_error", exc.error_type or None)
    if exc.status == 429:
        return APIError(
            429, f"the engine is at capacity: {exc.message}", "server_overloaded",
            "engine_overloaded", retry_after_s=1,
        )  # fmt: skip
    if exc.status == 424:
        return APIError(500, f"the engine failed to generate: {exc.message}", "server_error",
                        "generation_error")  # fmt: skip
    return APIError(502, f"the engine answered {exc.status}: {exc.message}", "server_error",
                    "engine_error")  # fmt: skip


def api_error(exc: BaseException) -> APIError:
    """Classify any exception that reached a route; unknown ones are the router's own fault."""
    if isinstance(exc, ModelNotFound):
        return APIError(404, exc.message, "invalid_request_error", "model_not_found", exc.param)
    if isinstance(exc, Unauthorized):
        return APIError(401, exc.message, "invalid_request_error", "invalid_api_key")
    if isinstance(exc, Forbidden):
        return APIError(403, exc.message, "invalid_request_error", "tier_not_allowed", exc.param)
    if isinstance(exc, QuotaExceeded):
        return APIError(429, exc.message, "requests", "rate_limit_exceeded",
                        retry_after_s=int(exc.retry_after_s))  # fmt: skip
    if isinstance(exc, PayloadTooLarge):
        return APIError(413, exc.message, "invalid_request_error", "payload_too_large")
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
        return APIError(503, exc.message, "server_error", "tier_unavailable", retry_after_s=10)
    if isinstance(exc, (RayActorError, ActorUnavailableError)):
        return APIError(503, "the tier replica serving this request died; retry", "server_error",
                        "replica_unavailable", retry_after_s=2)  # fmt: skip
    if isinstance(exc, BackPressureError):
        return APIError(429, "the tier's queue is full; retry shortly", "server_overloaded",
                        "tier_overloaded", retry_after_s=1)  # fmt: skip
    if isinstance(exc, DeploymentUnavailableError):
        return APIError(503, "the tier has no running replica", "server_error",
                        "tier_unavailable", retry_after_s=5)  # fmt: skip
    logger.error("router error", exc_info=exc)
    return APIError(500, f"the router failed: {type(exc).__name__}", "server_error", "router_error")
