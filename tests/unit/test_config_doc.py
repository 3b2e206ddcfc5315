"""docs/configuration.md: what `render` writes from the models, every setting described."""

from __future__ import annotations

from pathlib import Path

from serve_app import config_doc
from serve_app.config_doc import DOC, render, sections, settings, user_settings

MAX_USER_SETTINGS = 40


def test_the_committed_document_is_what_the_models_render() -> None:
    assert DOC.read_text() == render(), "docs/configuration.md is stale: run `make docs`"


def test_a_platform_engineer_decides_at_most_40_settings() -> None:
    user = [s.path for s in user_settings()]
    assert len(user) <= MAX_USER_SETTINGS, user
    assert f"User-facing settings: {len(user)}." in render()


def test_every_setting_and_section_is_described() -> None:
    undescribed = [
        s.path for section in sections() for s in section.settings if not s.field.description
    ]
    assert not undescribed
    assert all(section.model.__doc__ for section in sections())


def test_every_setting_has_a_row_under_its_section() -> None:
    text = render()
    for setting in settings():
        assert f"| `{setting.path}` |" in text, setting.path
    order = [text.index(f"## `{s.path}`") for s in sections() if s.path]
    assert order == sorted(order)


def test_user_sections_come_first_then_their_tuning_in_the_same_order() -> None:
    paths = [s.path for s in sections()]
    first_tuning = next(i for i, s in enumerate(sections()) if s.tuning)
    assert all(not s.tuning for s in sections()[:first_tuning])
    assert paths[first_tuning:] == [
        "tiers[].tuning",
        "tiers[].tuning.grammar",
        "tiers[].engine.tuning",
        "tiers[].routing.tuning",
        "tiers[].admission.tuning",
        "tiers[].scaling.tuning",
        "tiers[].candidate.engine.tuning",
        "router.tuning",
        "router.api_keys.tuning",
    ]


def test_types_and_defaults_read_as_in_a_config_file() -> None:
    text = render()
    assert "| `tiers[].engine.launcher` | one of `local`, `tgi`, `vllm` | `local` |" in text
    assert "| `tiers[].admission.max_in_flight` | integer > 0 | required |" in text
    assert "| `tiers[].scaling.tuning.hysteresis` | number >= 0, < 1 | `0.2` |" in text
    assert "| `router.tuning.tgi_any_tier_name` | boolean | `true` |" in text
    assert "| `tiers[].overflow_tier` | string, optional | unset |" in text
    assert "&lt;service_name>" in text  # not taken for an HTML tag


def test_render_writes_where_it_is_told(tmp_path: Path) -> None:
    target = tmp_path / "configuration.md"
    assert config_doc.main([str(target)]) == 0
    assert target.read_text() == render()
