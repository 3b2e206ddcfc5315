"""The command line: `python -m serve_app.kuberay render CONFIG --overlay NAME [--image IMAGE]
[--vllm-image IMAGE]` prints an overlay's manifests; `python -m serve_app.kuberay edge CONFIG
--kind ingress|gateway` the TLS edge for the config's router limits."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .edge import EDGES
from .images import DEFAULT_IMAGE, DEFAULT_VLLM_IMAGE
from .overlays import OVERLAYS
from .render import render_edge_file, render_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.kuberay")
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser(
        "render", help="print the RayService (and its NetworkPolicies, budgets) for a config"
    )
    cmd.add_argument("config", type=Path)
    cmd.add_argument("--overlay", choices=sorted(OVERLAYS), required=True)
    cmd.add_argument("--image", default=DEFAULT_IMAGE, help="every pod but vLLM tiers'")
    cmd.add_argument("--vllm-image", default=DEFAULT_VLLM_IMAGE,
                     help="the worker groups of tiers with `engine.launcher: vllm`")  # fmt: skip
    edge = commands.add_parser(
        "edge", help="print the Ingress (or Gateway and HTTPRoute) with the router's limits"
    )
    edge.add_argument("config", type=Path)
    edge.add_argument("--kind", choices=sorted(EDGES), required=True)
    args = parser.parse_args(argv)
    if args.command == "edge":
        sys.stdout.write(render_edge_file(args.config, args.kind))
    else:
        sys.stdout.write(render_file(args.config, args.overlay, args.image, args.vllm_image))
    return 0


if __name__ == "__main__":
    sys.exit(main())
