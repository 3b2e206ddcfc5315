"""The local engine's command line: TGI launcher's flags it takes."""

from __future__ import annotations

from serve_app.local_engine.cli import parse_args


def test_local_engine_takes_the_launcher_flags() -> None:
    args, ignored = parse_args(["--otlp-endpoint", "http://c:4317", "--otlp-service-name", "e"])
    assert (args.otlp_endpoint, args.otlp_service_name, ignored) == ("http://c:4317", "e", [])
    assert parse_args([])[0].otlp_endpoint is None


def test_a_simulated_cold_start_takes_its_load_time() -> None:
    assert parse_args(["--model-id", "simulated", "--sim-load-s", "30"])[0].sim_load_s == 30.0
    assert parse_args([])[0].sim_load_s == 0.0
