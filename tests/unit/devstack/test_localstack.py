"""The environment of a local stack's Ray processes: Ray's fast ingress, one head's own ports."""

from __future__ import annotations

from pathlib import Path

from devstack import localstack
from serve_app.kuberay import RAY_ENV
from serve_app.serve_env import CLIENT_TIMEOUT, INGRESS_GUARDS

FAST_INGRESS = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def test_every_ray_process_gets_the_fast_ingress() -> None:
    env = localstack.ray_env({"PATH": "/usr/bin"})
    assert FAST_INGRESS.items() <= env.items()
    assert FAST_INGRESS.items() <= {e["name"]: e["value"] for e in RAY_ENV}.items()


def test_two_heads_never_share_haproxy_ports_or_files(tmp_path: Path) -> None:
    one = localstack.ingress_env(str(tmp_path / "one"))
    two = localstack.ingress_env(str(tmp_path / "two"))
    assert set(one) == set(two) >= set(localstack.INGRESS_PORTS)
    for name in localstack.INGRESS_PORTS:
        assert one[name] != two[name] and int(one[name]) > 0, name
    paths = [value for name, value in one.items() if name not in localstack.INGRESS_PORTS]
    assert paths and all(Path(v).is_relative_to(tmp_path / "one" / "haproxy") for v in paths)
    # a Unix socket address holds 108 bytes, and Ray adds a 57-character node directory
    assert len(localstack.ingress_env("/tmp/ray-abcdefgh")["RAY_SERVE_HAPROXY_SOCKET_PATH"]) < 60


def test_ray_env_guards_serve_s_ingress_and_keeps_a_client_timeout_already_set() -> None:
    env = localstack.ray_env({"PATH": "/usr/bin"})
    assert INGRESS_GUARDS.items() <= env.items()
    assert env["PATH"] == f"{localstack.BIN}:/usr/bin"
    assert localstack.ray_env({"PATH": "/usr/bin", CLIENT_TIMEOUT: "12"})[CLIENT_TIMEOUT] == "12"


def test_a_configs_checkout_paths_are_made_absolute(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[3]
    config = localstack.yaml.safe_load((root / "configs" / "src" / "local-vllm.yaml").read_text())
    out = localstack.with_absolute_paths(config, tmp_path)
    small, vllm = out["applications"][0]["args"]["tiers"]
    assert small["engine"]["model_id"] == "smollm2-135m-instruct"  # an alias, not a path
    assert vllm["engine"]["model_id"] == str(tmp_path / ".vllm/models/smollm2-135m-instruct")
    assert vllm["engine"]["tuning"]["python"] == str(tmp_path / ".vllm/venv/bin/python")
    assert config["applications"][0]["args"]["tiers"][1]["engine"]["model_id"].startswith("./")


def test_a_rendered_configs_paths_are_made_absolute_in_every_application(tmp_path: Path) -> None:
    """The committed configs/local-vllm.yaml, one application per tier: the vLLM tier's own
    args and the router's copy of the whole configuration alike."""
    root = Path(__file__).resolve().parents[3]
    config = localstack.yaml.safe_load((root / "configs" / "local-vllm.yaml").read_text())
    text = localstack.yaml.safe_dump(localstack.with_absolute_paths(config, tmp_path))
    assert "./.vllm" in localstack.yaml.safe_dump(config)
    assert "./.vllm" not in text
    assert text.count(str(tmp_path / ".vllm/models/smollm2-135m-instruct")) >= 2


def test_the_deployed_config_is_written_beside_the_state(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[3]
    state = tmp_path / ".localstack" / "head.json"
    out = localstack.rendered(root / "configs" / "src" / "local-vllm.yaml", root, state)
    assert out.parent == state.parent
    deployed = localstack.yaml.safe_load(out.read_text())
    assert deployed["applications"][0]["args"]["tiers"][1]["engine"]["tuning"]["python"] == str(
        root / ".vllm/venv/bin/python"
    )
    assert localstack.tier_names(out) == ["small", "vllm-small"]
    # the rendered form `make up` deploys: the tiers are in the router's user_config
    assert localstack.tier_names(root / "configs" / "local.yaml") == ["small", "large"]


def test_the_local_node_takes_loopback_for_its_address() -> None:
    """What binds to the node's address (Ray's client server, engines on the direct data path)
    is then on 127.0.0.1; Ray would otherwise swap a loopback `--node-ip-address` for the
    machine's network address."""
    env = localstack.ray_env({"PATH": "/usr/bin"})
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
