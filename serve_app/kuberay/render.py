"""The RayService and everything else an overlay deploys, from a Serve config: `serveConfigV2`
with every tier and the router pinned to their groups, and the YAML the overlays commit."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from ..config import AppConfig
from ..serve_config import SOURCE_ENTRY
from ..serve_config import render as render_serve_config
from .disruption import GROUP_LABEL
from .edge import EDGES
from .groups import (
    ROUTER_RESOURCE,
    autoscaler_options,
    disruption_budgets,
    router_group,
    tier_resource,
    worker_group,
)
from .images import DEFAULT_IMAGE, DEFAULT_VLLM_IMAGE, VLLM_IMAGE_PYTHON, Images
from .overlays import OVERLAYS, Overlay
from .pods import SERVE_PORT, Role, pod
from .policies import network_policies
from .security import API_KEYS, RAY_TOKEN, events_account
from .sizing import head_shape

RAY_VERSION = "2.60.0"


def _cluster_args(args: dict[str, Any], config: AppConfig) -> dict[str, Any]:
    """The application's args for a cluster: every tier pinned to its worker group's resource,
    the router to the router group's, API keys read from the file the router's pods mount, and
    each vLLM tier's engine started with the vLLM image's interpreter unless the tier names one."""
    pinned = copy.deepcopy(args)
    pinned.pop("kubernetes", None)  # the renderer's, not the application's
    router = pinned.setdefault("router", {})
    router.setdefault("api_keys", {"file": API_KEYS.path})
    router.setdefault("ray_resources", {ROUTER_RESOURCE: 1})
    for raw, tier in zip(pinned["tiers"], config.tiers, strict=True):
        raw.setdefault("ray_resources", {tier_resource(tier): 1})
        if tier.engine.launcher == "vllm":
            tuning = raw.setdefault("engine", {}).setdefault("tuning", {})
            tuning.setdefault("python", VLLM_IMAGE_PYTHON)
    return pinned


def serve_config_v2(document: dict[str, Any]) -> tuple[str, AppConfig]:
    """The Serve config for the cluster (one application per tier and one for the router,
    `serve_app.serve_config`), and the configuration it holds, from a source config."""
    apps = document.get("applications") or []
    if len(apps) != 1 or apps[0].get("import_path") != SOURCE_ENTRY:
        raise ValueError(
            "a RayService is rendered from a source config (configs/src/): exactly one "
            f"application, of import_path {SOURCE_ENTRY}"
        )
    app = dict(apps[0])
    config = AppConfig.model_validate(app.get("args", {}))
    app["args"] = _cluster_args(app.get("args", {}), config)
    placed = AppConfig.model_validate(app["args"]).model_copy(
        update={"kubernetes": config.kubernetes}
    )
    rendered = render_serve_config(
        {
            "proxy_location": "EveryNode",
            "http_options": {"host": "0.0.0.0", "port": SERVE_PORT},
            "applications": [app],
        }
    )
    return yaml.safe_dump(rendered, sort_keys=False), placed


def render(
    document: dict[str, Any], overlay: Overlay, image: str = DEFAULT_IMAGE,
    vllm_image: str = DEFAULT_VLLM_IMAGE,
) -> dict[str, Any]:  # fmt: skip
    """The RayService: `image` for every pod but vLLM tiers', which run `vllm_image`."""
    serve_config, config = serve_config_v2(document)
    images = Images(image, vllm_image)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "llm", "labels": {"app.kubernetes.io/name": "serve-app"}},
        "spec": {
            "serveConfigV2": serve_config,
            "excludeHeadPodFromServeSvc": True,
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                # The token comes from this Secret (key `auth_token`), which KubeRay also reads
                # to call the dashboard; it creates none of its own.
                "authOptions": {"mode": "token", "secretName": RAY_TOKEN.secret},
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": autoscaler_options(),
                "headGroupSpec": {
                    # No replica on the head: it keeps the GCS, the dashboard and the Serve
                    # controller responsive. The dashboard listens on the pod network for the
                    # operator and the cluster's own pods (NetworkPolicy), behind the token.
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                    "template": pod(
                        Role.HEAD,
                        overlay,
                        image,
                        head_shape(config.kubernetes, overlay),
                        {GROUP_LABEL: "head"},
                    ),
                },
                "workerGroupSpecs": [
                    router_group(config, overlay, image),
                    *(
                        worker_group(t, config.kubernetes, overlay, images.for_tier(t))
                        for t in config.tiers
                    ),
                ],
            },
        },
    }


def manifests(
    document: dict[str, Any], overlay: Overlay, image: str,
    vllm_image: str = DEFAULT_VLLM_IMAGE,
) -> list[dict[str, Any]]:  # fmt: skip
    """Everything an overlay deploys that comes from the config."""
    service = render(document, overlay, image, vllm_image)
    _, config = serve_config_v2(document)
    return [service, *network_policies(overlay), *disruption_budgets(config), *events_account()]


class _ManifestDumper(yaml.SafeDumper):
    """Block style for multi-line strings (serveConfigV2 stays readable), and no anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ManifestDumper.add_representer(str, _str)


HEADER = (
    "# Rendered by `python -m serve_app.kuberay render {config} --overlay {overlay}`.\n"
    "# Do not edit: change the config and render again (a test fails on drift).\n"
    "# serveConfigV2 deploys every tier (`tier-<name>`) and the router (`llm`) as Serve\n"
    "# applications of their own: a change of a tier's engine, model, GPUs or other\n"
    "# replica-shaping settings restarts that tier's replicas only; token limits, replica\n"
    "# bounds, scaling, keys, quotas and the router's settings restart none (the list:\n"
    "# docs/configuration.md#what-a-change-restarts).\n"
)


def render_file(
    config: Path, overlay: str, image: str = DEFAULT_IMAGE, vllm_image: str = DEFAULT_VLLM_IMAGE
) -> str:
    document = yaml.safe_load(config.read_text())
    docs = manifests(document, OVERLAYS[overlay], image, vllm_image)
    header = HEADER.format(config=config.as_posix(), overlay=overlay)
    return header + yaml.dump_all(docs, Dumper=_ManifestDumper, sort_keys=False, width=100)


EDGE_HEADER = (
    "# Rendered by `python -m serve_app.kuberay edge {config} --kind {kind}`.\n"
    "# Do not edit: change the config and render again (a test fails on drift). Host, issuer and\n"
    "# class are examples: patch them in your overlay.\n"
)


def render_edge_file(config: Path, kind: str) -> str:
    """The edge of `kind` (`ingress`, `gateway`) for the config's router limits."""
    _, app = serve_config_v2(yaml.safe_load(config.read_text()))
    docs = EDGES[kind](app)
    header = EDGE_HEADER.format(config=config.as_posix(), kind=kind)
    return header + yaml.dump_all(docs, Dumper=_ManifestDumper, sort_keys=False, width=100)
