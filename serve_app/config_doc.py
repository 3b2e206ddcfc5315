"""`python -m serve_app.config_doc` (`make docs`): writes docs/configuration.md, every setting of
`AppConfig` with its type, default and description, read from the models themselves.

A section is a model inside the config, at its key path (`tiers[].engine`). The sections a user
meets come first, in the order of their fields; the `tuning` sections follow, each after the ones
of the sections before its owner. `render` is a pure function of the models, so that a test can
tell a stale docs/configuration.md.
"""

from __future__ import annotations

import inspect
import re
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from .config import TIER_LIVE, AppConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
TUNING = "tuning"
# The section only the KubeRay manifest renderer reads: documented in its own part, and not
# counted among the settings the application needs decided.
KUBERNETES = "kubernetes"
VERSIONS = "tiers[].version"
CANDIDATE = "tiers[].candidate"


@dataclass(frozen=True)
class Setting:
    """One field of a section: a leaf setting, or the key of a sub-section."""

    path: str  # key path, e.g. `tiers[].engine.model_id`
    field: FieldInfo
    section: type[BaseModel] | None  # the sub-section's model, None for a leaf
    tuning: bool  # under a `tuning` key

    @property
    def leaf(self) -> bool:
        return self.section is None


@dataclass(frozen=True)
class Section:
    path: str  # "" for the top level
    model: type[BaseModel]
    field: FieldInfo | None  # where its parent holds it; None for the top level
    tuning: bool
    owner: int  # the index of the section that holds it, in `_walk` order (-1: none)
    settings: tuple[Setting, ...]


def _section_model(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The model a field's value is (or is a list of, with True), or None for a leaf."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _section_model(args[0])
    if origin is tuple and args:
        model, _ = _section_model(args[0])
        return model, model is not None
    if origin in (Union, types.UnionType):
        for arg in args:
            model, many = _section_model(arg)
            if model is not None:
                return model, many
    return None, False


def _walk() -> list[Section]:
    """Every section, depth first in field order, the top level first."""
    found: list[Section] = []

    def visit(
        model: type[BaseModel], path: str, field: FieldInfo | None, tuning: bool, owner: int
    ) -> None:
        index = len(found)
        settings, children = [], []
        for name, info in model.model_fields.items():
            key = f"{path}.{name}" if path else name
            child, many = _section_model(info.annotation)
            under = tuning or name == TUNING
            settings.append(Setting(key, info, child, under))
            if child is not None:
                children.append((child, key + ("[]" if many else ""), info, under))
        found.append(Section(path, model, field, tuning, owner, tuple(settings)))
        for child, key, info, under in children:
            visit(child, key, info, under, index)

    visit(AppConfig, "", None, False, -1)
    return found


def sections() -> list[Section]:
    """The sections in the order the document lists them: the user's, then the tuning ones."""
    found = _walk()
    user = [s for s in found if not s.tuning]
    tuning = [s for s in found if s.tuning]
    # a tuning section right after those of the sections before its owner
    tuning.sort(key=lambda s: _root_owner(found, s))
    return user + tuning


def _root_owner(found: Sequence[Section], section: Section) -> int:
    """The index of the user section that a tuning section (or its sub-section) belongs to."""
    while found[section.owner].tuning:
        section = found[section.owner]
    return section.owner


def settings() -> list[Setting]:
    """Every leaf setting, in document order."""
    return [s for section in sections() for s in section.settings if s.leaf]


def _versions(path: str) -> bool:
    return path in (VERSIONS, CANDIDATE) or path.startswith(CANDIDATE + ".")


def _kubernetes(path: str) -> bool:
    return path == KUBERNETES or path.startswith(KUBERNETES + ".")


def user_settings() -> list[Setting]:
    """The leaf settings outside any `tuning` section and outside `kubernetes`: what a platform
    engineer decides for the application."""
    return [
        s for s in settings() if not s.tuning and not _kubernetes(s.path) and not _versions(s.path)
    ]


def version_settings() -> list[Setting]:
    """A tier's versions (`version`, `candidate`): what an operator sets for a while, during a
    rollout, not what the platform engineer decides once."""
    return [s for s in settings() if _versions(s.path)]


def kubernetes_settings() -> list[Setting]:
    """The leaf settings only the KubeRay manifest renderer reads."""
    return [s for s in settings() if _kubernetes(s.path)]


def tuning_settings() -> list[Setting]:
    return [s for s in settings() if s.tuning and not _versions(s.path)]


# -- rendering ----------------------------------------------------------------------------------

_NAMES = {int: "integer", float: "number", str: "string", bool: "boolean"}
_TAG = re.compile(r"<(?=[A-Za-z/!?])")


def _bounds(metadata: Sequence[Any]) -> list[str]:
    out = []
    for item in metadata:
        if isinstance(item, FieldInfo):
            out += _bounds(item.metadata)
        elif isinstance(item, annotated_types.Gt):
            out.append(f"> {item.gt}")
        elif isinstance(item, annotated_types.Ge):
            out.append(f">= {item.ge}")
        elif isinstance(item, annotated_types.Lt):
            out.append(f"< {item.lt}")
        elif isinstance(item, annotated_types.Le):
            out.append(f"<= {item.le}")
        elif isinstance(item, annotated_types.MinLen):
            out.append(f"(min length {item.min_length})")
        elif getattr(item, "pattern", None):
            out.append(f"matching `{item.pattern}`")
    return out


def _type(annotation: Any, metadata: Sequence[Any] = ()) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        text = _type(args[0], (*args[1:], *metadata))
    elif origin in (Union, types.UnionType):
        kinds = [_type(a) for a in args if a is not type(None)]
        text = " or ".join(kinds) + (", optional" if type(None) in args else "")
        metadata = ()
    elif origin is Literal:
        text = "one of " + ", ".join(f"`{v}`" for v in args)
    elif origin is tuple:
        text = f"list of {_plural(_type(args[0]))}"
    elif origin is dict:
        text = f"map of {_type(args[0])} to {_type(args[1])}"
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        text = "section"
    else:
        text = _NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))
    bounds = _bounds(metadata)
    return f"{text} {', '.join(bounds)}" if bounds else text


def _plural(kind: str) -> str:
    return kind if kind.startswith("one of") else kind + "s"


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return str(value)


def _default(setting: Setting) -> str:
    default = setting.field.default
    if default is PydanticUndefined:
        return "required"
    if default is None:
        return "unset"
    if isinstance(default, BaseModel):
        return "its defaults"
    return f"`{_value(default)}`"


def _markdown(text: str) -> str:
    """`text` on one line, a `<` that would open an HTML tag escaped (outside code spans)."""
    parts = " ".join(text.split()).split("`")
    return "`".join(p if i % 2 else _TAG.sub("&lt;", p) for i, p in enumerate(parts))


def _cell(text: str) -> str:
    return _markdown(text).replace("|", "\\|")


def _paragraph(text: str | None) -> str:
    return _markdown(inspect.cleandoc(text)) if text else ""


def _heading(section: Section) -> str:
    return f"`{section.path}`" if section.path else "Top level"


def _render_section(section: Section) -> list[str]:
    lines = [f"## {_heading(section)}", ""]
    about = [_paragraph(section.model.__doc__)]
    if section.field is not None and not section.tuning:  # a tuning section's says no more
        about.append(_paragraph(section.field.description))
    lines += [" ".join(p for p in about if p), ""]
    lines += ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]
    for s in section.settings:
        kind = _type(s.field.annotation, s.field.metadata)
        description = s.field.description or ""
        if not s.leaf:
            description += f" See `{s.path}{'[]' if kind.startswith('list') else ''}`."
        lines.append(
            f"| `{s.path}` | {_cell(kind)} | {_cell(_default(s))} | {_cell(description)} |"
        )
    return [*lines, ""]


def _restarts() -> list[str]:
    """What a change of each setting restarts (`serve_app.serve_config`), from `TIER_LIVE`."""
    live = ", ".join(f"`tiers[].{path}`" for path in TIER_LIVE)
    return [
        "## What a change restarts",
        "",
        "Rendered, every tier is a Serve application of its own (`tier-<name>`) and the router "
        "another (`llm`): `serve deploy` restarts only the replicas of an application whose "
        "replica-shaping settings changed, and applies every other change to the running "
        "replicas.",
        "",
        f"- Applied live, no replica or engine restarted: {live}; and every `router` setting "
        "but the two below.",
        "- Restart that tier's replicas and engines, and nothing else: every other `tiers[]` "
        "setting (its engine, model and flags, GPUs, `routing`, `ray_resources`, "
        "`request_timeout_s`, the rest of its `tuning`).",
        "- Restart the router's replicas (and the quota ledger): `router.api_keys` set or "
        "unset, `router.ray_resources`.",
        "- Restart every replica: `tracing`.",
        "",
        "How and why: [operations.md](operations.md#changing-the-configuration).",
        "",
    ]


def render() -> str:
    """docs/configuration.md."""
    user, tuning = user_settings(), tuning_settings()
    kubernetes, versions = kubernetes_settings(), version_settings()
    lines = [
        "# Configuration",
        "",
        "<!-- Written by `make docs` (`python -m serve_app.config_doc`) from "
        "serve_app/config.py: edit the models' descriptions there, not this file. -->",
        "",
        "The application's settings are the `args` of its entry in a source config (see "
        "configs/src/local.yaml and configs/src/gpu.yaml), validated as "
        "`serve_app.config.AppConfig`; `make configs` renders them into the Serve configs "
        "configs/local.yaml and configs/gpu.yaml. An unknown key is an error that names it.",
        "",
        *_restarts(),
        "Each section holds what a platform engineer decides; the mechanism behind it (buffer "
        "sizes, intervals, lease timings, cost-model constants) sits in the section's `tuning`, "
        "whose defaults suit most deployments. A tuning setting given at its section's own "
        "level is an error that says where it went (e.g. `lease_idle_s` moved to "
        "`tuning.lease_idle_s`).",
        "",
        "The `kubernetes` section is read only by the KubeRay manifest renderer (`python -m "
        "serve_app.kuberay render`): pod sizes and placement, disruption budgets and spread "
        "(docs/kubernetes.md). Its settings are listed in a part of their own.",
        "",
        "A tier's `version` and `candidate` are set during a rollout (docs/operations.md, "
        '"Versions: canary, shadow, rollback, promote") and counted apart.',
        "",
        f"User-facing settings: {len(user)}. Version settings: {len(versions)}. "
        f"Kubernetes settings: {len(kubernetes)}. Tuning settings: {len(tuning)}.",
        "",
        "Key paths: `a.b` is key `b` of section `a`; `a[]` is a list of sections.",
        "",
    ]
    first_tuning = first_kubernetes = True
    for section in sections():
        if _kubernetes(section.path) and first_kubernetes:
            lines += ["# Kubernetes", "", "Read only by the KubeRay manifest renderer.", ""]
            first_kubernetes = False
        if section.tuning and first_tuning:
            lines += ["# Tuning", "", "Mechanism; the defaults suit most deployments.", ""]
            first_tuning = False
        lines += _render_section(section)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Write docs/configuration.md (or the path given)."""
    args = list(sys.argv[1:] if argv is None else argv)
    target = Path(args[0]) if args else DOC
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render())
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
