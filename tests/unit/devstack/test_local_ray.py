from __future__ import annotations

from pathlib import Path

from devstack.local_ray import Head, head_args


def test_a_private_head_takes_no_default_port_and_a_short_temp_dir() -> None:
    head = Head.private()
    ports = [head.gcs_port, head.dashboard_port, head.metrics_port, head.client_port,
             head.agent_port]  # fmt: skip
    assert len(set(ports)) == len(ports)
    assert head.temp_dir.startswith("/tmp/ray-") and len(head.temp_dir) < 30
    assert Path(head.temp_dir).is_dir()


def test_head_args_name_every_port_ray_would_take_by_default() -> None:
    head = Head(1, 2, 3, 4, 5, "/tmp/ray-x", num_cpus=3)
    args = head_args(head)
    expected = ["--port=1", "--dashboard-port=2", "--metrics-export-port=3",
                "--ray-client-server-port=4", "--dashboard-agent-listen-port=5",
                "--temp-dir=/tmp/ray-x", "--num-cpus=3", "--dashboard-host=127.0.0.1",
                "--node-ip-address=127.0.0.1"]  # fmt: skip
    assert set(expected) <= set(args)
    assert args[0] == "--head"


def test_a_head_round_trips_through_its_state_file(tmp_path: Path) -> None:
    head = Head(1, 2, 3, 4, 5, "/tmp/ray-x", sessions=(10, 11))
    head.save(tmp_path / "s" / "head.json")
    assert Head.load(tmp_path / "s" / "head.json") == head
    assert Head.load(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{")
    assert Head.load(tmp_path / "bad.json") is None


def test_a_head_on_an_address_of_its_own_listens_and_is_reached_there() -> None:
    head = Head(1, 2, 3, 4, 5, "/tmp/ray-x", host="10.77.3.2")
    args = head_args(head)
    assert {"--node-ip-address=10.77.3.2", "--dashboard-host=10.77.3.2"} <= set(args)
    assert head.address == "10.77.3.2:1" and head.dashboard == "http://10.77.3.2:2"
    assert "--node-ip-address=127.0.0.1" in head_args(Head(1, 2, 3, 4, 5, "x"))  # loopback
