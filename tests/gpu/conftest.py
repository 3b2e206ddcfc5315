from __future__ import annotations

import shutil
import subprocess

import pytest


def gpu_uuids() -> list[str]:
    """Physical GPUs in index order, as nvidia-smi lists them; empty without a GPU."""
    if shutil.which("nvidia-smi") is None:
        return []
    listing = subprocess.run(
        ["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return [line.strip() for line in listing.stdout.splitlines() if line.strip()]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    count = len(gpu_uuids())
    for item in items:
        item.add_marker(pytest.mark.gpu)
        needed = item.get_closest_marker("needs_gpus")
        if needed and count < needed.args[0]:
            item.add_marker(
                pytest.mark.skip(reason=f"needs {needed.args[0]} NVIDIA GPUs, found {count}")
            )
