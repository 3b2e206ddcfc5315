"""The usage log's line: its fields, and what a caller-set feature may be."""

from __future__ import annotations

import json

import pytest

from serve_app.router.usage_log import UsageRecord, feature, key_id


def test_a_line_is_one_json_object_with_every_field() -> None:
    record = UsageRecord(
        time=1.5, request_id="r1", key_id="abc", tenant="team-a", feature="search",
        route="/v1/chat/completions", model="gpt-4o", tier="large", status=200,
        prompt_tokens=10, completion_tokens=3, ttft_s=0.1, duration_s=0.4,
    )  # fmt: skip
    line = record.line()
    assert "\n" not in line
    assert json.loads(line) == {
        "time": 1.5, "request_id": "r1", "key_id": "abc", "tenant": "team-a",
        "feature": "search", "route": "/v1/chat/completions", "model": "gpt-4o",
        "tier": "large", "status": 200, "prompt_tokens": 10, "completion_tokens": 3,
        "ttft_s": 0.1, "duration_s": 0.4,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("given", "kept"),
    [("search", "search"), ("team/search:v2", "team/search:v2"), (None, None), ("", None),
     ("a" * 65, None), ("two words", None), ('"}{', None), ("é", None)],
)  # fmt: skip
def test_a_feature_is_a_short_plain_name_or_nothing(given: str | None, kept: str | None) -> None:
    assert feature(given) == kept


def test_a_key_id_tells_keys_apart_without_the_key() -> None:
    assert key_id(bytes.fromhex("ab" * 32)) == "ab" * 6


def test_lines_go_bare_to_stdout_unless_the_logger_is_routed_already(
    capfd: pytest.CaptureFixture[str],
) -> None:
    from serve_app.router import usage_log

    saved = (list(usage_log.logger.handlers), usage_log.logger.level, usage_log.logger.propagate)
    try:
        usage_log.logger.handlers.clear()
        usage_log.to_stdout()
        usage_log.to_stdout()  # once only
        assert len(usage_log.logger.handlers) == 1
        record = UsageRecord(1.0, None, None, None, None, "/generate", None, "small", 200, 1, 2,
                             0.1, 0.2)  # fmt: skip
        usage_log.write(record)
        assert capfd.readouterr().out == record.line() + "\n"
    finally:
        for handler in usage_log.logger.handlers:
            handler.close()
        usage_log.logger.handlers[:] = saved[0]
        usage_log.logger.setLevel(saved[1])
        usage_log.logger.propagate = saved[2]
