"""The Ray Serve environment every Ray process gets: Serve's ingress runs the router's header
screen, and HAProxy's client timeout is bounded unless the environment sets its own."""

from __future__ import annotations

import importlib

from serve_app.kuberay import RAY_ENV
from serve_app.router.ingress import HeaderScreen, middlewares
from serve_app.serve_env import (
    CLIENT_TIMEOUT,
    INGRESS_GUARDS,
    SERVE_TUNING,
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
        CLIENT_TIMEOUT: "12",
    }


def test_kuberay_pods_get_the_tuning_and_the_guards_as_they_are() -> None:
    assert {**SERVE_TUNING, **INGRESS_GUARDS}.items() <= KUBERAY_ENV.items()


def test_a_cluster_started_by_hand_is_told_what_it_lacks() -> None:
    assert missing_protections({**SERVE_TUNING, **INGRESS_GUARDS}) == {}
    assert missing_protections({**SERVE_TUNING, **INGRESS_GUARDS, CLIENT_TIMEOUT: "12"}) == {}
    bare = missing_protections({})
    assert bare == {**SERVE_TUNING, **INGRESS_GUARDS}
    assert missing_protections({**SERVE_TUNING})[CLIENT_TIMEOUT] == "30"
