"""API keys from a file or the environment: keys added and revoked without a restart."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from serve_app.config import ApiKeysConfig
from serve_app.errors import Unauthorized
from serve_app.router.auth import FileKeyRing, KeyRing, key_ring

from .clock import Clock

KEY_A = "sk-team-a-0123456789abcdef"
KEY_B = "sk-team-b-0123456789abcdef"


def keys(*pairs: tuple[str, str]) -> str:
    return yaml.safe_dump([{"name": name, "key": key} for name, key in pairs])


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_a_file_that_is_invalid_at_start_fails_the_start(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("- name: a\n  key: short\n")
    with pytest.raises(ValueError, match=r"invalid: key: String should have at least 16"):
        key_ring(ApiKeysConfig(file=str(path)))


def test_keys_added_and_removed_take_effect_without_a_restart(tmp_path: Path) -> None:
    path, clock = tmp_path / "keys.yaml", Clock()
    path.write_text(keys(("team-a", KEY_A)))
    ring = FileKeyRing(path, interval_s=10, clock=clock)
    assert ring.authenticate(bearer(KEY_A)).name == "team-a"
    with pytest.raises(Unauthorized):
        ring.authenticate(bearer(KEY_B))
    path.write_text(keys(("team-b", KEY_B)))
    clock.now += 10
    assert ring.authenticate(bearer(KEY_B)).name == "team-b"
    with pytest.raises(Unauthorized):
        ring.authenticate(bearer(KEY_A))


def test_an_empty_list_revokes_every_key(tmp_path: Path) -> None:
    path, clock = tmp_path / "keys.yaml", Clock()
    path.write_text(keys(("team-a", KEY_A)))
    ring = FileKeyRing(path, interval_s=1, clock=clock)
    path.write_text("[]\n")
    clock.now += 1
    with pytest.raises(Unauthorized):
        ring.authenticate(bearer(KEY_A))


def test_a_file_source_reloads_and_an_env_source_is_read_once(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(keys(("team-a", KEY_A)))
    assert isinstance(key_ring(ApiKeysConfig(file=str(path))), FileKeyRing)
    assert key_ring(None) is None


def test_keys_from_the_environment_are_read_once() -> None:
    os.environ["SERVE_APP_TEST_KEYS"] = keys(("team-a", KEY_A))
    try:
        ring = key_ring(ApiKeysConfig(env="SERVE_APP_TEST_KEYS"))
    finally:
        del os.environ["SERVE_APP_TEST_KEYS"]
    assert isinstance(ring, KeyRing)
    assert ring.authenticate(bearer(KEY_A)).name == "team-a"


def test_a_revoked_key_is_no_longer_held(tmp_path: Path) -> None:
    path, clock = tmp_path / "keys.yaml", Clock()
    path.write_text(keys(("team-a", KEY_A), ("team-b", KEY_B)))
    ring = FileKeyRing(path, interval_s=10, clock=clock)
    team_a = ring.authenticate(bearer(KEY_A))
    assert ring.holds(team_a)
    path.write_text(keys(("team-b", KEY_B)))
    clock.now += 10
    assert not ring.holds(team_a)
    assert ring.holds(ring.authenticate(bearer(KEY_B)))
