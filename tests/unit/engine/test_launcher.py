"""What a replica runs: argv and environment for TGI and the local engine."""

from __future__ import annotations

import re
import sys
import typing
from pathlib import Path

import pytest

from serve_app.config import EngineConfig, Quantize, TierConfig, TracingConfig
from serve_app.engine.launcher import Ports, build_launch, with_hf_token


def tgi_tier(gpus: int) -> TierConfig:
    return TierConfig(
        name="large",
        engine=EngineConfig(launcher="tgi", model_id="meta-llama/Llama-3.1-8B-Instruct",
                            quantize="fp8", revision="main"),
        gpus_per_replica=gpus,
    )  # fmt: skip


def ports(n: int) -> Ports:
    return Ports(http=8000 + n, prometheus=9000 + n, master=29500 + n,
                 shard_uds_path=f"/tmp/replica-{n}/tgi-shard")  # fmt: skip


def flag(argv: tuple[str, ...], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


@pytest.mark.parametrize("gpus", [1, 2, 4])
def test_tgi_argv_follows_assigned_gpus(gpus: int) -> None:
    ids = [str(i + 3) for i in range(gpus)]
    spec = build_launch(tgi_tier(gpus), ports(0), ids, {"PATH": "/usr/bin"})
    assert spec.argv[0] == "text-generation-launcher"
    assert flag(spec.argv, "--num-shard") == str(gpus)
    assert spec.env["CUDA_VISIBLE_DEVICES"] == ",".join(ids)
    assert flag(spec.argv, "--master-port") == ("29500" if gpus > 1 else None)
    assert flag(spec.argv, "--quantize") == "fp8"
    assert flag(spec.argv, "--usage-stats") == "off"
    assert "--json-output" in spec.argv


def test_two_replicas_on_one_host_share_nothing() -> None:
    a = build_launch(tgi_tier(2), ports(1), ["0", "1"], {})
    b = build_launch(tgi_tier(2), ports(2), ["2", "3"], {})
    for name in ("--port", "--prometheus-port", "--shard-uds-path", "--master-port"):
        assert flag(a.argv, name) != flag(b.argv, name), name
    assert a.env["CUDA_VISIBLE_DEVICES"] != b.env["CUDA_VISIBLE_DEVICES"]


def test_hostname_is_loopback_whatever_the_pod_is_called() -> None:
    spec = build_launch(tgi_tier(1), ports(0), ["0"], {"HOSTNAME": "llm-worker-7f9c"})
    assert flag(spec.argv, "--hostname") == "127.0.0.1"
    assert "HOSTNAME" not in spec.env


def test_an_engine_for_direct_streaming_listens_on_the_node_with_its_own_key() -> None:
    direct = Ports(8000, 9000, 29500, "/tmp/r/tgi-shard", host="10.0.3.7")
    spec = build_launch(tgi_tier(1), direct, ["0"], {}, api_key="k-123")
    assert flag(spec.argv, "--hostname") == "10.0.3.7"
    # TGI's launcher reads `API_KEY`: the key stays out of the command line ps shows.
    assert spec.env["API_KEY"] == "k-123" and "k-123" not in spec.argv
    assert "API_KEY" not in build_launch(tgi_tier(1), direct, ["0"], {}).env


def test_secrets_pass_through_but_are_never_shown() -> None:
    tier = TierConfig(
        name="small",
        engine=EngineConfig(extra_args=("--api-key", "sk-engine-secret")),
    )
    spec = build_launch(tier, ports(0), [], {"HF_TOKEN": "hf_secret", "AWS_SECRET": "x"})
    assert spec.env["HF_TOKEN"] == "hf_secret"
    assert "AWS_SECRET" not in spec.env
    shown = spec.redacted()
    assert "sk-engine-secret" not in shown and "hf_secret" not in shown


def test_the_hf_token_is_read_from_its_file_at_each_start(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("hf_first\n")
    environ = {"HF_TOKEN_PATH": str(token), "PATH": "/usr/bin"}
    first = build_launch(tgi_tier(1), ports(0), ["0"], with_hf_token(environ))
    assert first.env["HF_TOKEN"] == "hf_first"
    assert "hf_first" not in first.redacted()
    token.write_text("hf_rotated")
    assert build_launch(tgi_tier(1), ports(0), ["0"], with_hf_token(environ)).env["HF_TOKEN"] == (
        "hf_rotated"
    )
    assert "HF_TOKEN" not in environ  # the replica's own environment never holds it


@pytest.mark.parametrize("content", [None, "", "\n"])
def test_no_token_file_or_an_empty_one_means_no_token(tmp_path: Path, content: str | None) -> None:
    token = tmp_path / "token"
    if content is not None:
        token.write_text(content)
    spec = build_launch(tgi_tier(1), ports(0), ["0"], with_hf_token({"HF_TOKEN_PATH": str(token)}))
    assert "HF_TOKEN" not in spec.env


def test_local_engine_takes_the_same_flags_on_cpu() -> None:
    spec = build_launch(TierConfig(name="small"), ports(0), [], {})
    assert spec.argv[:3] == (sys.executable, "-m", "serve_app.local_engine")
    assert spec.env["CUDA_VISIBLE_DEVICES"] == ""
    assert "--num-shard" not in spec.argv
    tgi = build_launch(tgi_tier(1), ports(0), ["0"], {})
    local_flags = {a for a in spec.argv if a.startswith("--")}
    assert local_flags <= {a for a in tgi.argv if a.startswith("--")}


LAUNCHER_SOURCE = (
    Path(__file__).resolve().parents[4] / "shared" / "refs" / "tgi" / "launcher-main.rs"
)


@pytest.mark.skipif(not LAUNCHER_SOURCE.exists(), reason="TGI's launcher source is not here")
def test_quantize_takes_exactly_tgis_values() -> None:
    """`engine.quantize` is TGI 3.3.7's `Quantization` enum, as clap spells it (kebab-case)."""
    source = LAUNCHER_SOURCE.read_text()
    body = source[source.index("enum Quantization {") :].split("\n}", 1)[0]
    variants = re.findall(r"^\s{4}([A-Z][A-Za-z0-9]*),$", body, flags=re.MULTILINE)
    kebab = {re.sub(r"(?<=[a-z0-9])([A-Z])", r"-\1", v).lower() for v in variants}
    assert kebab == set(typing.get_args(Quantize))


TRACING = TracingConfig(otlp_endpoint="http://collector:4317", service_name="llm")


def test_launch_passes_otlp_flags_before_extra_args() -> None:
    tier = TierConfig(name="t", engine=EngineConfig(extra_args=("--foo",)))
    ports = Ports(1, 2, 3, "/tmp/x")
    argv = build_launch(tier, ports, [], {}, TRACING).argv
    at = argv.index("--otlp-endpoint")
    assert argv[at : at + 4] == ("--otlp-endpoint", "http://collector:4317",
                                 "--otlp-service-name", "llm-engine")  # fmt: skip
    assert argv[-1] == "--foo"
    assert "--otlp-endpoint" not in build_launch(tier, ports, [], {}).argv
