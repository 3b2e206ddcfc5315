"""The command line: `python -m serve_app.kuberay render CONFIG --overlay NAME [--image IMAGE]`
prints an overlay's manifests."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .overlays import OVERLAYS
from .render import DEFAULT_IMAGE, render_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.kuberay")
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser(
        "render", help="print the RayService (and its NetworkPolicies, fill Job) for a config"
    )
    cmd.add_argument("config", type=Path)
    cmd.add_argument("--overlay", choices=sorted(OVERLAYS), required=True)
    cmd.add_argument("--image", default=DEFAULT_IMAGE)
    args = parser.parse_args(argv)
    sys.stdout.write(render_file(args.config, args.overlay, args.image))
    return 0


if __name__ == "__main__":
    sys.exit(main())
