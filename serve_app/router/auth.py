"""API keys: who is calling, and which tiers they may use.

Keys come from a file (mounted from a Kubernetes Secret, re-read when it changes: see
`keyfile.py`) or from an environment variable (read once, at router start), as a JSON or YAML
list:

    - name: team-a                 # the tenant: appears in logs and metrics, the key never does
      key: sk-...                  # the secret; only its SHA-256 is kept in memory
      tiers: [small]               # optional: tiers this key may use (default: all)
      requests_per_minute: 60      # optional quotas, enforced across router replicas
      tokens_per_minute: 100000
      tokens_per_day: 5000000      # optional budget, from 00:00 UTC (429 insufficient_quota)
      priority: interactive        # optional: or `batch` (runs after interactive in a full tier)
      weight: 1                    # optional: share of a full tier's tokens against other keys

A request presents its key as `Authorization: Bearer <key>` or `x-api-key: <key>`; its hash is
compared with every known hash in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import ApiKeysConfig
from ..errors import Forbidden, Unauthorized
from ..metrics import keys_reloaded
from .keyfile import Outcome, ReloadingFile

if TYPE_CHECKING:
    from ..engine.sse import Batch
    from .dispatch import Calls


class _KeySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    key: str = Field(min_length=16)
    tiers: tuple[str, ...] | None = None
    requests_per_minute: int | None = Field(None, gt=0)
    tokens_per_minute: int | None = Field(None, gt=0)
    tokens_per_day: int | None = Field(None, gt=0)
    priority: Literal["interactive", "batch"] = "interactive"
    weight: float = Field(1.0, gt=0)


@dataclass(frozen=True)
class Tenant:
    name: str
    key_sha256: bytes
    tiers: frozenset[str] | None
    requests_per_minute: int | None
    tokens_per_minute: int | None
    priority: Literal["interactive", "batch"] = "interactive"
    weight: float = 1.0
    tokens_per_day: int | None = None

    def check_tier(self, tier: str) -> None:
        if self.tiers is not None and tier not in self.tiers:
            raise Forbidden(f"this API key may not use tier {tier!r}", param="model")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def load_tenants(config: ApiKeysConfig, environ: Mapping[str, str]) -> list[Tenant]:
    """Read and hash the keys; a bad document fails the router's start with a clear error."""
    if config.file is not None:
        return parse_tenants(Path(config.file).read_text(), config.file)
    return parse_tenants(environ.get(config.env or "", ""), f"${config.env}")


def parse_tenants(text: str, source: str) -> list[Tenant]:
    """The tenants of a keys document; `ValueError` naming `source`, the entry and the field
    (never a key) when it is invalid. An empty list is valid: every key revoked."""
    if not text.strip():
        raise ValueError(f"API keys are switched on but {source} is empty")
    try:
        specs = [_KeySpec.model_validate(item) for item in yaml.safe_load(text) or []]
    except (ValidationError, TypeError, yaml.YAMLError) as exc:
        # The message names the entry and field; pydantic never echoes the `key` value here
        # because it is a plain string that validated.
        raise ValueError(f"API keys in {source} are invalid: {_safe(exc)}") from None
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"API keys in {source}: tenant names must be unique")
    return [
        Tenant(
            name=s.name,
            key_sha256=_digest(s.key),
            tiers=frozenset(s.tiers) if s.tiers is not None else None,
            requests_per_minute=s.requests_per_minute,
            tokens_per_minute=s.tokens_per_minute,
            priority=s.priority,
            weight=s.weight,
            tokens_per_day=s.tokens_per_day,
        )
        for s in specs
    ]


def _safe(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return type(exc).__name__


class Authenticator(Protocol):
    def authenticate(self, headers: Mapping[str, str]) -> Tenant: ...
    def holds(self, tenant: Tenant) -> bool: ...


class KeyRing:
    def __init__(self, tenants: list[Tenant]) -> None:
        self._tenants = tenants

    def authenticate(self, headers: Mapping[str, str]) -> Tenant:
        presented = headers.get("authorization", "")
        key = presented[7:].strip() if presented[:7].lower() == "bearer " else ""
        key = key or headers.get("x-api-key", "").strip()
        if not key:
            raise Unauthorized(
                "no API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`"
            )
        digest = _digest(key)
        found = None
        for tenant in self._tenants:  # every hash is compared: timing says nothing
            if hmac.compare_digest(digest, tenant.key_sha256):
                found = tenant
        if found is None:
            raise Unauthorized("the API key is not valid")
        return found

    def holds(self, tenant: Tenant) -> bool:
        """Whether `tenant`'s key is still one of these (not revoked since it was presented)."""
        return any(hmac.compare_digest(tenant.key_sha256, t.key_sha256) for t in self._tenants)


class FileKeyRing:
    """The keys of a file, re-read when it changes (at most `reload_interval_s` old)."""

    def __init__(
        self,
        path: Path,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_reload: Callable[[Outcome], None] = lambda outcome: None,
    ) -> None:
        self._source = str(path)
        self._file = ReloadingFile(path, self._parse, interval_s, clock, on_reload)

    def _parse(self, text: str) -> KeyRing:
        return KeyRing(parse_tenants(text, self._source))

    def authenticate(self, headers: Mapping[str, str]) -> Tenant:
        return self._file.current().authenticate(headers)

    def holds(self, tenant: Tenant) -> bool:
        return self._file.current().holds(tenant)


class KeyedCalls:
    """A stream's batches while its key stays valid: looked at once a second at most, so that
    a revoked key's streams end (with an error event; the engine's work is cancelled) within
    the keys' reload interval and a second, at no cost per chunk worth counting."""

    CHECK_S = 1.0

    def __init__(
        self,
        calls: Calls[Batch | None],
        keys: Authenticator,
        tenant: Tenant,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._calls = calls
        self._keys = keys
        self._tenant = tenant
        self._clock = clock
        self._next = clock() + self.CHECK_S

    def __aiter__(self) -> KeyedCalls:
        return self

    async def __anext__(self) -> Batch | None:
        batch = await anext(self._calls)
        now = self._clock()
        if now >= self._next:
            self._next = now + self.CHECK_S
            if not self._keys.holds(self._tenant):
                raise Unauthorized("the API key was revoked during this stream")
        return batch

    def cancel(self) -> None:
        self._calls.cancel()


def key_ring(config: ApiKeysConfig | None) -> Authenticator | None:
    if config is None:
        return None
    if config.file is not None:
        return FileKeyRing(
            Path(config.file), config.tuning.reload_interval_s, on_reload=keys_reloaded
        )
    return KeyRing(load_tenants(config, os.environ))
