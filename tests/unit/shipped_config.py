"""The shipped local config's application arguments, and a way to change one field of them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


def local_args() -> dict[str, Any]:
    """A fresh copy of the application arguments in configs/src/local.yaml."""
    config = yaml.safe_load((ROOT / "configs" / "src" / "local.yaml").read_text())
    return copy.deepcopy(config["applications"][0]["args"])


def set_path(args: dict[str, Any], path: str, value: Any) -> None:
    """Set the field at a dotted `path` (list items by index), creating mappings on the way."""
    *parents, last = path.split(".")
    node: Any = args
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[int(last) if last.isdigit() else last] = value
