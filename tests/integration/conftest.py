from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import free_port, wait_for


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.integration)


class RunningEngine:
    def __init__(self, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.process = process
        self.log = log


def start_engine(log: Path, *flags: str) -> RunningEngine:
    """The local engine as the supervisor starts it: a real process on a real port."""
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "serve_app.local_engine", "--port", str(port), *flags],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"engine exited with {process.returncode}:\n{log.read_text()}")
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, 60, "the local engine to be ready")
    return RunningEngine(url, process, log)


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningEngine]:
    log = tmp_path_factory.mktemp("engine") / "engine.log"
    running = start_engine(
        log,
        "--max-batch-size", "2",
        "--max-concurrent-requests", "8",
        "--max-input-tokens", "512",
        "--max-total-tokens", "1024",
    )  # fmt: skip
    yield running
    running.process.terminate()
    running.process.wait(timeout=60)
