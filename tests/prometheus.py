"""A real Prometheus server for the tests: Debian's `prometheus` package, installed on demand."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import yaml

from devstack.hosts import free_port
from tests.helpers import wait_for

PACKAGE = "prometheus"


def install() -> str | None:
    """Make `prometheus` and `promtool` available; the reason when that is impossible."""
    if shutil.which("prometheus") and shutil.which("promtool"):
        return None
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine to install Debian's prometheus package"
    apt = ["apt-get", "-q", "-o", "DPkg::Lock::Timeout=300"]
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            return "installing Debian's prometheus package needs root (or sudo)"
        apt = ["sudo", "-n", *apt]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for args in (["update"], ["install", "-y", "--no-install-recommends", PACKAGE]):
        done = subprocess.run([*apt, *args], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            return f"apt-get {' '.join(args)} failed: {done.stderr.strip()[-500:]}"
    if not (shutil.which("prometheus") and shutil.which("promtool")):
        return f"Debian's {PACKAGE} package installed no prometheus/promtool"
    return None


def check_rules(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)


class Prometheus:
    """One Prometheus process scraping `targets` every `interval`, evaluating `rules`."""

    def __init__(self, workdir: Path, targets: list[str], rules: dict[str, Any]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (workdir / "rules.yaml").write_text(yaml.safe_dump(rules))
        config = {
            "global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
            "rule_files": [str(workdir / "rules.yaml")],
            "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": targets}]}],
        }
        (workdir / "prometheus.yaml").write_text(yaml.safe_dump(config))
        self.log = workdir / "prometheus.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={workdir / 'prometheus.yaml'}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for(self._ready, 60, "Prometheus to be ready")

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{self.log.read_text()[-2000:]}")
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def api(self, path: str, **params: Any) -> Any:
        """`/api/v1/<path>`'s `data`; a query Prometheus refuses raises with its error."""
        reply = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30).json()
        if reply["status"] != "success":
            raise AssertionError(f"{path} {params}: {reply.get('errorType')}: {reply.get('error')}")
        return reply["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
