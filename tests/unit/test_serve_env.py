"""The Ray Serve environment every Ray process gets: Serve's ingress runs the router's header
screen, and HAProxy's client timeout is bounded unless the environment sets its own."""

from __future__ import annotations

import importlib

from serve_app.kuberay import RAY_ENV
from serve_app.router.ingress import HeaderScreen, middlewares
from serve_app.serve_env import (
    CLIENT_TIMEOUT,
    HAPROXY_BINARY,
    IMAGE_SCRIPTS,
    INGRESS_GUARDS,
    SERVE_TUNING,
    haproxy_guard,
    ingress_guards,
    missing_protections,
)

KUBERAY_ENV = {e["name"]: e["value"] for e in RAY_ENV}


def test_serve_finds_the_middleware_where_the_ray_environment_points() -> None:
    for env in (ingress_guards({}), KUBERAY_ENV):
        module, name = env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"].split(":")
        found = getattr(importlib.import_module(module), name)()
        assert [m.cls for m in found] == [m.cls for m in middlewares()] == [HeaderScreen]


def test_haproxys_client_timeout_is_bounded_and_can_be_set() -> None:
    assert ingress_guards({})[CLIENT_TIMEOUT] == "30"
    assert ingress_guards({CLIENT_TIMEOUT: ""})[CLIENT_TIMEOUT] == "30"
    assert ingress_guards({CLIENT_TIMEOUT: "12", "OTHER": "x"}) == {
        **INGRESS_GUARDS,
        **haproxy_guard(),
        CLIENT_TIMEOUT: "12",
    }


def test_haproxy_is_started_through_the_launcher_of_this_install_or_the_image() -> None:
    assert ingress_guards({})[HAPROXY_BINARY].endswith("/serve-app-haproxy")
    assert haproxy_guard("/x/bin") == {HAPROXY_BINARY: "/x/bin/serve-app-haproxy"}
    assert KUBERAY_ENV[HAPROXY_BINARY] == f"{IMAGE_SCRIPTS}/serve-app-haproxy"


def test_kuberay_pods_get_the_tuning_and_the_guards_as_they_are() -> None:
    assert {**SERVE_TUNING, **INGRESS_GUARDS}.items() <= KUBERAY_ENV.items()


def test_a_cluster_started_by_hand_is_told_what_it_lacks() -> None:
    guarded = {**SERVE_TUNING, **ingress_guards({})}
    assert missing_protections(guarded) == {}
    assert missing_protections({**guarded, CLIENT_TIMEOUT: "12"}) == {}
    bare = missing_protections({})
    assert bare == guarded
    assert missing_protections({**SERVE_TUNING})[CLIENT_TIMEOUT] == "30"
