"""Unit tests run without Ray: none may start it (`make test-unit` runs them alone)."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def _no_ray() -> Iterator[None]:
    yield
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized(), "a unit test started Ray"
