"""Where `make install-vllm` puts vLLM and its weights, and a skip for tests that need them."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".vllm" / "venv" / "bin" / "python"
VLLM_MODEL = ROOT / ".vllm" / "models" / "smollm2-135m-instruct"
INSTALLED = (ROOT / ".vllm" / "venv" / ".installed").is_file()
CONVERTED = (VLLM_MODEL / ".converted").is_file()

needs_vllm = pytest.mark.skipif(
    not (INSTALLED and CONVERTED),
    reason="vLLM is not installed in .vllm/venv with its weights: run `make install-vllm`",
)
