"""The model cache's markers, and the shell the fill Job and the serving pods' init container
run: executed here with /bin/sh against a fake downloader, so that a failed fill is shown to be
visible (the reason beside the marker, the init container failing with it)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from serve_app.kuberay.model_cache import (
    FAILURE_LINES,
    failed_marker,
    fill_marker,
    fill_steps,
    wait_for_cache,
    wait_script,
)
from serve_app.kuberay.pods import MODEL_CACHE

MODEL = "org/gated-model"


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
    container = wait_for_cache("image:1", marker, "m")
    assert container["command"][-1] == wait_script(marker, "m")
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert container["volumeMounts"] == [
        {"name": "models", "mountPath": MODEL_CACHE, "readOnly": True}
    ]


def sh(script: str, tmp: Path, **env: str) -> subprocess.CompletedProcess[str]:
    path = f"{tmp / 'bin'}:{os.environ['PATH']}"
    return subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True,
                          env={"PATH": path, **env}, timeout=30)  # fmt: skip


def downloader(tmp: Path, body: str) -> None:
    """A `text-generation-server` on PATH that runs `body`."""
    binary = tmp / "bin" / "text-generation-server"
    binary.parent.mkdir(exist_ok=True)
    binary.write_text(f"#!/bin/sh\n{body}\n")
    binary.chmod(binary.stat().st_mode | stat.S_IEXEC)


def fill(tmp: Path) -> subprocess.CompletedProcess[str]:
    steps = ["set -eu", f"mkdir -p {tmp}/.serve-app",
             *fill_steps(MODEL, None, str(tmp), str(tmp / "fill.log"))]  # fmt: skip
    return sh("\n".join(steps) + "\n", tmp)


def test_a_failed_download_leaves_its_reason_and_the_serving_pod_fails_with_it(
    tmp_path: Path,
) -> None:
    noise = "\n".join(f"echo progress {i}" for i in range(40))
    downloader(tmp_path, f'{noise}\necho "401 Client Error: access to model {MODEL} is '
                         f'restricted" >&2\nexit 3')  # fmt: skip
    filled = fill(tmp_path)
    marker = fill_marker(MODEL, None, str(tmp_path))
    assert filled.returncode == 1  # the Job's pod fails, and the Job retries it
    assert "progress 39" in filled.stdout  # the download's own output stays in the Job's log
    reason = Path(failed_marker(marker)).read_text()
    assert reason.startswith(f"text-generation-server download-weights {MODEL} failed (exit 3)")
    assert "401 Client Error" in reason and "progress 0\n" not in reason
    assert len(reason.splitlines()) == FAILURE_LINES + 1
    assert not Path(marker).exists()

    waited = sh(wait_script(marker, MODEL), tmp_path)
    assert waited.returncode == 1
    assert f"filling the model cache with {MODEL} failed" in waited.stderr
    assert "401 Client Error" in waited.stderr and "kubectl logs -l" in waited.stderr

    # the Job's next attempt succeeds: the reason goes, the marker comes, the pod starts
    downloader(tmp_path, "echo downloaded")
    assert fill(tmp_path).returncode == 0
    assert Path(marker).exists() and not Path(failed_marker(marker)).exists()
    assert sh(wait_script(marker, MODEL), tmp_path).returncode == 0


def test_a_fill_that_never_comes_fails_the_wait_with_a_pointer_to_the_job(tmp_path: Path) -> None:
    marker = fill_marker(MODEL, None, str(tmp_path))
    waited = sh(wait_script(marker, MODEL, limit_s=2, poll_s=1), tmp_path)
    assert waited.returncode == 1
    assert f"{MODEL} is not in the model cache after 2s" in waited.stderr
    assert "kubectl get jobs -l app.kubernetes.io/name=serve-app" in waited.stderr
    assert waited.stdout.count("waiting for") == 2
