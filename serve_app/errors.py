"""The application's error vocabulary. No HTTP here: the router maps these to status codes once.

    ServeAppError
    ├── RequestError          the client asked for something invalid
    │   ├── InvalidRequest    a field is wrong (names the field in `param`)
    │   ├── ModelNotFound     no tier answers to that model name
    │   ├── PayloadTooLarge   the body is over the router's limit
    │   ├── Unauthorized      no API key, or an unknown one
    │   ├── Forbidden         the key may not use that tier
    │   ├── QuotaExceeded     the key's requests or tokens per minute, or its daily budget, are
    │   │                     spent (which, in `kind`)
    │   ├── HeadersTooLarge   the request's headers are over the router's limit
    │   └── RequestTimeout    the body did not arrive within the router's time limit
    ├── EngineReplyError      the engine answered with an error status and body
    ├── EngineUnavailable     the engine could not be reached, or did not answer in time
    │   └── EngineUnreachable the engine refused the connection: nothing was sent to it
    ├── TierUnavailable       no replica of the tier took the request: none runs, or none in time
    ├── TierOverloaded        Serve's queue for the tier is full
    ├── ReplicaUnavailable    the tier replica serving the request died or cannot be reached
    ├── QuotaUnavailable      the quota ledger did not answer, and keys with quotas are refused
    ├── AdmissionRefused      the tier's admission queue is full, or the wait for a turn too long
    └── EngineStartupError    the engine exited or timed out while starting

Every error pickles with all its fields, since tier replicas raise them across Ray to the router.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

QuotaKind = Literal["requests", "tokens", "budget"]


@dataclass(frozen=True)
class RateLimit:
    """Where one of a key's per-minute budgets stands (OpenAI's `x-ratelimit-*` headers)."""

    kind: QuotaKind
    limit: int
    remaining: int
    reset_s: float


class ServeAppError(Exception):
    pass


class RequestError(ServeAppError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message, param)
        self.message = message
        self.param = param


class InvalidRequest(RequestError):
    pass


class ModelNotFound(RequestError):
    pass


class PayloadTooLarge(RequestError):
    pass


class Unauthorized(RequestError):
    pass


class Forbidden(RequestError):
    pass


class QuotaExceeded(RequestError):
    def __init__(
        self,
        message: str,
        retry_after_s: float,
        kind: QuotaKind = "requests",
        limits: tuple[RateLimit, ...] = (),
    ) -> None:
        super().__init__(message)
        self.args = (message, retry_after_s, kind, limits)
        self.retry_after_s = retry_after_s
        self.kind = kind
        self.limits = limits


class HeadersTooLarge(RequestError):
    pass


class RequestTimeout(RequestError):
    pass


class EngineReplyError(ServeAppError):
    """The engine said no: `status` and its TGI body (`{"error", "error_type"}`)."""

    def __init__(self, status: int, message: str, error_type: str) -> None:
        super().__init__(status, message, error_type)
        self.status = status
        self.message = message
        self.error_type = error_type


class EngineUnavailable(ServeAppError):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EngineUnreachable(EngineUnavailable):
    """No connection to the engine (it exited, or its replica is being replaced): the request
    never reached it, so it may go to another replica."""


class TierUnavailable(ServeAppError):
    """`retry_after_s`: how long a client should wait: longer while replicas start."""

    def __init__(self, message: str, retry_after_s: int = 10) -> None:
        super().__init__(message, retry_after_s)
        self.message = message
        self.retry_after_s = retry_after_s


class TierOverloaded(ServeAppError):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ReplicaUnavailable(ServeAppError):
    """The replica died or is out of reach. Before it took the call nothing was sent to its
    engine, so the call may go to another replica."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class QuotaUnavailable(ServeAppError):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class AdmissionRefused(ServeAppError):
    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, retry_after_s)
        self.message = message
        self.retry_after_s = retry_after_s


class EngineStartupError(ServeAppError):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
