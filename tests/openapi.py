"""TGI's published OpenAPI spec as JSON Schema validators (read from ../shared, never copied)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

SPEC_PATH = Path(__file__).resolve().parents[2] / "shared" / "refs" / "tgi" / "openapi.json"


def _json_schema(node: Any) -> Any:
    """OpenAPI 3.0 → JSON Schema: `nullable: true` becomes an explicit null alternative."""
    if isinstance(node, list):
        return [_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _json_schema(v) for k, v in node.items() if k not in ("nullable", "example")}
    if node.get("nullable"):
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


@cache
def spec() -> dict[str, Any]:
    return json.loads(SPEC_PATH.read_text())


@cache
def _components() -> dict[str, Any]:
    return _json_schema(spec()["components"])


def response_validator(path: str, method: str, content_type: str) -> Draft202012Validator:
    """The validator of a route's 200 answer (for streams: of each event's data)."""
    schema = spec()["paths"][path][method]["responses"]["200"]["content"][content_type]["schema"]
    return Draft202012Validator({**_json_schema(schema), "components": _components()})


def schema_validator(name: str) -> Draft202012Validator:
    """The validator of one of the spec's named schemas."""
    return Draft202012Validator(
        {"$ref": f"#/components/schemas/{name}", "components": _components()}
    )
