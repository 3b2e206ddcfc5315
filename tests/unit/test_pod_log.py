from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from serve_app import pod_log


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    pod_log.stream.cache_clear()
    yield
    out = pod_log.stream()
    if out is not None:
        out.close()
    pod_log.stream.cache_clear()


def test_without_the_variable_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pod_log.ENV, raising=False)
    target = logging.getLogger("test.pod_log.none")
    assert not pod_log.attach(target)
    assert target.handlers == []


def test_lines_reach_the_pod_log_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "pod.log"
    monkeypatch.setenv(pod_log.ENV, str(path))
    target = logging.getLogger("test.pod_log.lines")
    target.setLevel(logging.INFO)
    try:
        assert pod_log.attach(target) and pod_log.attach(target)  # attached once
        assert len(target.handlers) == 1
        target.info("[tier=small replica=abc] engine ready")
        target.debug("not at this level")
        assert path.read_text() == "[tier=small replica=abc] engine ready\n"
    finally:
        target.handlers.clear()


def test_a_pod_log_that_cannot_be_opened_is_ignored(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(pod_log.ENV, str(tmp_path / "missing" / "pod.log"))
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        assert not pod_log.attach(logging.getLogger("test.pod_log.bad"))
    assert "cannot be opened" in caplog.text


def test_the_kubernetes_pods_write_to_their_first_process() -> None:
    from serve_app.kuberay.pods import RAY_ENV

    assert {"name": pod_log.ENV, "value": "/proc/1/fd/1"} in RAY_ENV
