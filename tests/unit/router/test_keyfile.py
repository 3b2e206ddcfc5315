"""A file re-read when it changes (the API keys file): what the router sees and when."""

from __future__ import annotations

import os
from pathlib import Path

from serve_app.router.keyfile import ReloadingFile

from .clock import Clock


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


def test_every_reload_says_how_it_went(tmp_path: Path) -> None:
    """What the keys' metrics count: a stale file is reported, not silently kept."""
    path, clock = tmp_path / "value", Clock()
    path.write_text("1")
    outcomes: list[str] = []
    watched = ReloadingFile(path, int, interval_s=1, clock=clock, on_reload=outcomes.append)
    for text in ("", "2", "2"):  # an empty file, a good one, the same one again
        path.write_text(text)
        clock.now += 1
        watched.current()
    path.unlink()
    clock.now += 1
    assert watched.current() == 2
    assert outcomes == ["ok", "invalid", "ok", "unreadable"]
