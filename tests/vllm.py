"""Where `make install-vllm` puts vLLM and its weights, and a skip for tests that need them."""

from __future__ import annotations

from pathlib import Path

import pytest

from devstack.hosts import Process, live_processes

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".vllm" / "venv" / "bin" / "python"
VLLM_MODEL = ROOT / ".vllm" / "models" / "smollm2-135m-instruct"
INSTALLED = (ROOT / ".vllm" / "venv" / ".installed").is_file()
CONVERTED = (VLLM_MODEL / ".converted").is_file()

needs_vllm = pytest.mark.skipif(
    not (INSTALLED and CONVERTED),
    reason="vLLM is not installed in .vllm/venv with its weights: run `make install-vllm`",
)


def vllm_processes(tmpdir: str) -> dict[int, Process]:
    """Every process of the vLLM engines whose replicas ran with TMPDIR=`tmpdir` (its API
    server, engine core, workers, resource tracker), by pid. Found by environment, which
    they all inherit (`VLLM_HOST_IP` is set for vLLM only), so an orphan is found too."""
    found = {}
    for process in live_processes():
        try:
            environ = Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"TMPDIR={tmpdir}".encode() in environ and any(
            item.startswith(b"VLLM_HOST_IP=") for item in environ
        ):
            found[process.pid] = process
    return found
