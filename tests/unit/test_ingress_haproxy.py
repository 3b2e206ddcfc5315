"""`serve-app-haproxy`: Ray's HAProxy with Ray's arguments, kernel splicing off, and the
binary found under the launcher rather than the launcher itself."""

from __future__ import annotations

import os
import subprocess
import sysconfig
from pathlib import Path

from serve_app.ingress_haproxy import NO_SPLICE, argv
from serve_app.serve_env import HAPROXY_BINARY, HAPROXY_LAUNCHER


def test_rays_arguments_follow_the_switch_that_turns_splicing_off() -> None:
    assert argv("/bin/haproxy", ["-db", "-f", "x.cfg"]) == [
        "/bin/haproxy", NO_SPLICE, "-db", "-f", "x.cfg"
    ]  # fmt: skip


def test_the_installed_launcher_runs_the_bundled_haproxy_under_its_own_name() -> None:
    launcher = Path(sysconfig.get_path("scripts")) / HAPROXY_LAUNCHER
    env = {**os.environ, HAPROXY_BINARY: str(launcher)}  # as Ray's processes have it
    out = subprocess.run([str(launcher), "-vv"], env=env, capture_output=True, text=True,
                         timeout=30, check=True)  # fmt: skip
    assert out.stdout.startswith("HAProxy version 2.8"), out.stdout[:200]
