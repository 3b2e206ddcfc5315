"""The one table from errors to HTTP: OpenAI's shape on /v1, TGI's on TGI's routes, and the
rate-limit headers a refused or admitted key sees."""

from __future__ import annotations

import json

import pytest

from serve_app.errors import (
    EngineReplyError,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    QuotaExceeded,
    RateLimit,
    Unauthorized,
)
from serve_app.router.errors import APIError, api_error, rate_limit_headers


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (ModelNotFound("no such model", "model"), 404, "model_not_found"),
        (Unauthorized("bad key"), 401, "invalid_api_key"),
        (PayloadTooLarge("too big"), 413, "payload_too_large"),
        (InvalidRequest("bad field", "temperature"), 400, None),
    ],
)
def test_a_refused_request_has_one_status_and_code(
    exc: Exception, status: int, code: str | None
) -> None:
    error = api_error(exc)
    assert (error.status, error.code) == (status, code)
    assert error.openai_body()["error"]["message"] == str(exc.args[0])


def test_an_invalid_request_is_400_on_openai_routes_and_422_validation_on_tgis() -> None:
    error = api_error(InvalidRequest("`temperature` must be positive", "temperature"))
    openai = error.response()
    tgi = error.response(tgi=True)
    assert openai.status_code == 400
    assert json.loads(openai.body)["error"] == {
        "message": "`temperature` must be positive",
        "type": "invalid_request_error",
        "param": "temperature",
        "code": None,
    }
    assert tgi.status_code == 422
    assert json.loads(tgi.body) == {
        "error": "`temperature` must be positive",
        "error_type": "validation",
    }


def test_an_engines_validation_error_keeps_its_status_and_type_on_tgis_routes() -> None:
    error = api_error(EngineReplyError(413, "Input validation error: too long", "validation"))
    assert error.status == 400 and error.type == "invalid_request_error"
    assert error.tgi_status() == 413
    assert error.tgi_body() == {
        "error": "Input validation error: too long",
        "error_type": "validation",
    }


def test_an_engine_at_capacity_is_429_overloaded_with_a_short_retry() -> None:
    error = api_error(EngineReplyError(429, "Model is overloaded", "overloaded"))
    assert (error.status, error.code, error.headers()) == (429, "engine_overloaded",
                                                           {"Retry-After": "1"})  # fmt: skip
    assert error.tgi_body()["error_type"] == "overloaded"


@pytest.mark.parametrize(
    ("status", "tgi_type"),
    [(404, "validation"), (429, "overloaded"), (503, "overloaded"), (500, "generation")],
)
def test_tgis_error_type_follows_the_status_unless_named(status: int, tgi_type: str) -> None:
    assert APIError(status, "m", "server_error").tgi_body()["error_type"] == tgi_type
    named = APIError(status, "m", "server_error", tgi_type="incomplete_generation")
    assert named.tgi_body()["error_type"] == "incomplete_generation"


@pytest.mark.parametrize(
    ("reset_s", "shown"),
    [(0.1201, "121ms"), (0.0, "0ms"), (1.0, "1s"), (59.2, "1m0s"), (360.0, "6m0s"), (61, "1m1s")],
)
def test_reset_times_in_openais_form(reset_s: float, shown: str) -> None:
    headers = rate_limit_headers((RateLimit("requests", 60, 0, reset_s),))
    assert headers["x-ratelimit-reset-requests"] == shown


def test_a_quota_refusal_names_each_budget_and_when_to_retry() -> None:
    limits = (RateLimit("requests", 3, 0, 20.0), RateLimit("tokens", 300, 120, 0.5))
    error = api_error(QuotaExceeded("over the requests quota", 20.4, "requests", limits))
    assert (error.status, error.type, error.code) == (429, "requests", "rate_limit_exceeded")
    assert error.headers() == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "20s",
        "x-ratelimit-limit-tokens": "300",
        "x-ratelimit-remaining-tokens": "120",
        "x-ratelimit-reset-tokens": "500ms",
        "Retry-After": "20",
    }
