"""Which image each Ray pod runs: TGI's (kuberay/Dockerfile) for the head, the router and TGI or
local-engine tiers, vLLM's (kuberay/Dockerfile.vllm) for tiers with `engine.launcher: vllm`.

Both images carry the same Ray and the same Python (Ray requires both to match on every node of
a cluster); they differ in the engine beside them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import TierConfig

DEFAULT_IMAGE = "registry.example.com/serve-app:0.1.0"
DEFAULT_VLLM_IMAGE = "registry.example.com/serve-app-vllm:0.1.0"
# vLLM's interpreter in its image (vLLM installed into the system Python 3.12); the Ray worker
# runs in the image's own environment and starts vLLM with this one (`engine.tuning.python`).
VLLM_IMAGE_PYTHON = "/usr/bin/python3"


@dataclass(frozen=True)
class Images:
    """The rendered images: `default` for every pod but vLLM tiers', `vllm` for those."""

    default: str = DEFAULT_IMAGE
    vllm: str = DEFAULT_VLLM_IMAGE

    def for_tier(self, tier: TierConfig) -> str:
        return self.vllm if tier.engine.launcher == "vllm" else self.default
