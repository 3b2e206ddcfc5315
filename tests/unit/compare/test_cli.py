from __future__ import annotations

from pathlib import Path

import pytest

from serve_app.compare.__main__ import main, parse_args


def test_targets_are_distinct_names() -> None:
    assert parse_args(["--eval", "e.jsonl", "--targets", "small, large"]).target_list == [
        "small",
        "large",
    ]
    for bad in (",", "small,small"):
        with pytest.raises(SystemExit):
            parse_args(["--eval", "e.jsonl", "--targets", bad])
    with pytest.raises(SystemExit):
        parse_args(["--eval", "e.jsonl", "--targets", "a", "--concurrency", "0"])


def test_a_bad_eval_set_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n{"promt": "y"}\n')
    assert main(["--eval", str(bad), "--targets", "small", "--out", str(tmp_path)]) == 2
    assert "bad.jsonl:2: unknown field(s) promt" in capsys.readouterr().err
