"""What a caller can put into a metric label: bounded."""

from __future__ import annotations

from serve_app.metrics import FeatureLabels


def test_features_become_labels_up_to_a_limit_then_other() -> None:
    labels = FeatureLabels(limit=2)
    assert [labels.label(f) for f in ("search", "chat", "search", "ads", None)] == [
        "search", "chat", "search", "other", "none"
    ]  # fmt: skip
