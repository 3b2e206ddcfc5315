"""The API keys file, re-read when it changes: what the router sees and when."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from serve_app.config import ApiKeysConfig
from serve_app.errors import Unauthorized
from serve_app.router.auth import FileKeyRing, KeyRing, key_ring
from serve_app.router.keyfile import ReloadingFile

KEY_A = "sk-team-a-0123456789abcdef"
KEY_B = "sk-team-b-0123456789abcdef"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def keys(*pairs: tuple[str, str]) -> str:
    return yaml.safe_dump([{"name": name, "key": key} for name, key in pairs])


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_a_change_is_seen_once_the_interval_has_passed(tmp_path: Path) -> None:
    path, clock = tmp_path / "value", Clock()
    path.write_text("1")
    watched = ReloadingFile(path, int, interval_s=10, clock=clock)
    path.write_text("2")
    clock.now += 9.9
    assert watched.current() == 1
    clock.now += 0.1
    assert watched.current() == 2


def test_an_invalid_or_missing_file_keeps_the_last_good_value(tmp_path: Path) -> None:
    path, clock = tmp_path / "value", Clock()
    path.write_text("1")
    watched = ReloadingFile(path, int, interval_s=1, clock=clock)
    path.write_text("not a number")
    clock.now += 1
    assert watched.current() == 1
    path.unlink()
    clock.now += 1
    assert watched.current() == 1
    path.write_text("3")
    clock.now += 1
    assert watched.current() == 3


def test_a_secret_volume_update_is_seen(tmp_path: Path) -> None:
    """The kubelet's way: files live in a timestamped directory; `..data` is swapped."""
    for version, text in (("v1", "1"), ("v2", "2")):
        (tmp_path / version).mkdir()
        (tmp_path / version / "value").write_text(text)
    os.symlink("v1", tmp_path / "..data")
    os.symlink("..data/value", tmp_path / "value")
    clock = Clock()
    watched = ReloadingFile(tmp_path / "value", int, interval_s=1, clock=clock)
    os.symlink("v2", tmp_path / "..data_tmp")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    clock.now += 1
    assert watched.current() == 2


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
