"""What is deployed stays apart from what develops it: the product imports neither the
development stack, the tests nor the benchmarks, and the development stack not the tests."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_packages(package: str) -> dict[str, set[str]]:
    """Each module of `package`: the top-level packages it imports (relative imports stay
    inside `package` and are left out)."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize(
    ("package", "uses", "kept_out"),
    [
        ("serve_app", "ray", {"devstack", "tests", "bench"}),
        ("devstack", "serve_app", {"tests", "bench"}),
    ],
)
def test_a_package_imports_nothing_it_must_not(package: str, uses: str, kept_out: set[str]) -> None:
    modules = imported_packages(package)
    assert any(uses in names for names in modules.values())  # the imports are read at all
    assert {m: names & kept_out for m, names in modules.items() if names & kept_out} == {}
