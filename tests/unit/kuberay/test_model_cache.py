"""The model cache's markers: one per model and revision, where every serving pod looks."""

from __future__ import annotations

from serve_app.kuberay.model_cache import fill_marker, wait_for_cache
from serve_app.kuberay.pods import MODEL_CACHE


def test_a_marker_names_one_model_at_one_revision() -> None:
    marker = fill_marker("HuggingFaceTB/SmolLM2-135M-Instruct", None)
    assert marker == fill_marker("HuggingFaceTB/SmolLM2-135M-Instruct", None)
    assert marker.startswith(f"{MODEL_CACHE}/.serve-app/filled-")
    others = {
        fill_marker("HuggingFaceTB/SmolLM2-135M-Instruct", "main"),
        fill_marker("HuggingFaceTB/SmolLM2-360M-Instruct", None),
        # the name and revision are not simply joined: no pair stands for another
        fill_marker("a", "b/c"),
        fill_marker("a/b", "c"),
    }
    assert marker not in others and len(others) == 4


def test_a_serving_pod_waits_for_its_models_marker_on_a_read_only_cache() -> None:
    marker = fill_marker("m", "r")
    container = wait_for_cache("image:1", marker)
    assert container["command"][-1] == (
        f"until [ -f {marker} ]; do echo waiting for {marker}; sleep 10; done"
    )
    assert container["volumeMounts"] == [
        {"name": "models", "mountPath": MODEL_CACHE, "readOnly": True}
    ]
