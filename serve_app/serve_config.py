"""`python -m serve_app.serve_config SOURCE`: the Serve config that deploys every tier, and the
router, as an application of its own.

A source config (e.g. `configs/src/local.yaml`) is a Serve config whose one application
(`import_path: serve_app.app:build_app`) holds the whole `AppConfig` in its `args`. Rendered,
that application becomes:

- one application per tier, `tier-<name>` (`serve_app.app:build_tier`, no route): its `args` are
  the settings that shape its replicas and engine (`config.engine_settings`); its deployment's
  `user_config` and replica bounds are the live ones (`config.TIER_LIVE`). A tier with a
  `version` is `tier-<name>@<version>`, and its `candidate` one more, `tier-<name>@<candidate>`,
  whose args are those the tier will have once the candidate is promoted (so promoting restarts
  neither version: Serve only deletes the former stable one);
- the router's application (named as the source's, `serve_app.app:build_router`, the route): its
  `args` say only whether it holds the quota ledger, where its replicas run and how it traces;
  the whole configuration is its deployment's `user_config`.

Serve redeploys only an application whose import path or `args` changed, and applies a changed
`user_config` or replica bound to the running replicas (`reconfigure`): a `serve deploy` that
changes one tier's engine restarts that tier's replicas and nothing else, and one that changes a
live setting restarts nothing. The renderer is pure, and a config already rendered comes back
unchanged.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from .config import AppConfig, TierConfig, engine_settings

SOURCE_ENTRY = "serve_app.app:build_app"
TIER_ENTRY = "serve_app.app:build_tier"
ROUTER_ENTRY = "serve_app.app:build_router"
ROUTER_DEPLOYMENT = "router"


def version_id(tier: str, version: str | None = None) -> str:
    """One version of a tier: `<name>`, or `<name>@<version>` once versions are named (the
    router's key for a candidate, the key its replicas publish their start-up phases under)."""
    return tier if version is None else f"{tier}@{version}"


def tier_app_name(tier: str, version: str | None = None) -> str:
    """A tier's application, or one version's (`tier-<name>@<version>`, the tier's `version` or
    its candidate's); its one deployment has the same name."""
    return f"tier-{version_id(tier, version)}"


def scaling_options(tier: TierConfig) -> dict[str, Any]:
    """A tier's replica bounds as Serve applies them live. Every tier, fixed ones too, scales
    with the queue-length policy (within equal bounds a fixed tier does not move), so that its
    bounds, and a change between fixed and scaling, restart nothing. The policy takes no
    arguments: its rule comes from the replicas (`serve_app.autoscaling`), since Serve rebuilds
    the application when a policy's arguments change."""
    bounds = tier.replicas
    return {
        "autoscaling_config": {
            "min_replicas": bounds.min,
            "max_replicas": bounds.max,
            "initial_replicas": bounds.min,
            # Delays, steps and hysteresis are the policy's own; Serve adds none.
            "upscale_delay_s": 0,
            "downscale_delay_s": 0,
            # Load reaches the controller every second, not every ten (Ray 2.60 still reads
            # the push interval from this deprecated field).
            "metrics_interval_s": 1,
            "look_back_period_s": 2,
            "policy": {"policy_function": "serve_app.autoscaling:QueueLengthPolicy"},
        }
    }


def request_router_config(tier: TierConfig, routers: int) -> dict[str, Any]:
    """A tier with `routing`: replica choice by engine state (`serve_app.tier.request_router`),
    each of `routers` router replicas taking its share."""
    assert tier.routing is not None
    return {
        "request_router_class": "serve_app.tier.request_router:EngineAwareRouter",
        "request_router_kwargs": {"routing": tier.routing.model_dump(), "routers": routers},
        "request_routing_stats_period_s": tier.routing.tuning.stats_period_s,
        "request_routing_stats_timeout_s": 5,
    }


def tier_user_config(tier: TierConfig) -> dict[str, Any]:
    """What a tier's replicas apply live (`TierDeployment.reconfigure`)."""
    return {
        "scaling": tier.scaling.model_dump(mode="json"),
        "gpu_hour_price_usd": tier.tuning.gpu_hour_price_usd,
    }


def tier_app(tier: TierConfig, config: AppConfig) -> dict[str, Any]:
    name = tier_app_name(tier.name, tier.version)
    args: dict[str, Any] = {"tier": engine_settings(tier)}
    if tier.routing is not None:
        args["routers"] = config.router.replicas  # the replica choice's share of each router
    if config.tracing is not None:
        args["tracing"] = config.tracing.model_dump(mode="json", exclude_unset=True)
    deployment = {"name": name, **scaling_options(tier), "user_config": tier_user_config(tier)}
    return {
        "name": name,
        "route_prefix": None,
        "import_path": TIER_ENTRY,
        "args": args,
        "deployments": [deployment],
    }


def router_app(name: str, route_prefix: Any, config: AppConfig) -> dict[str, Any]:
    args: dict[str, Any] = {"ledger": config.router.api_keys is not None}
    if config.router.ray_resources:
        args["ray_resources"] = dict(config.router.ray_resources)
    if config.tracing is not None:
        args["tracing"] = config.tracing.model_dump(mode="json", exclude_unset=True)
    deployment = {
        "name": ROUTER_DEPLOYMENT,
        "num_replicas": config.router.replicas,
        "user_config": config.model_dump(mode="json", exclude_unset=True),
    }
    return {
        "name": name,
        "route_prefix": route_prefix,
        "import_path": ROUTER_ENTRY,
        "args": args,
        "deployments": [deployment],
    }


def applications(app: dict[str, Any]) -> list[dict[str, Any]]:
    """One source application as the router's application and one per tier."""
    config = AppConfig.model_validate(app.get("args") or {})
    router = router_app(app.get("name", "llm"), app.get("route_prefix", "/"), config)
    tiers = [tier_app(tier, config) for tier in config.tiers]
    candidates = [tier_app(t.candidate_tier(), config) for t in config.tiers if t.candidate]
    return [router, *tiers, *candidates]


def render(document: dict[str, Any]) -> dict[str, Any]:
    """`document` with every source application (`SOURCE_ENTRY`) rendered; other applications,
    and the rest of the document, as they are."""
    rendered = {key: value for key, value in document.items() if key != "applications"}
    apps: list[dict[str, Any]] = []
    for app in document.get("applications") or []:
        apps.extend(applications(app) if app.get("import_path") == SOURCE_ENTRY else [app])
    rendered["applications"] = apps
    return rendered


def source_config(document: dict[str, Any]) -> AppConfig:
    """The `AppConfig` of a document, source or rendered: its source application's args, or its
    router's `user_config`."""
    for app in document.get("applications") or []:
        if app.get("import_path") == SOURCE_ENTRY:
            return AppConfig.model_validate(app.get("args") or {})
        if app.get("import_path") == ROUTER_ENTRY:
            (router,) = (d for d in app["deployments"] if d["name"] == ROUTER_DEPLOYMENT)
            return AppConfig.model_validate(router["user_config"])
    raise ValueError(f"no application imports {SOURCE_ENTRY} or {ROUTER_ENTRY}")


HEADER = (
    "# Rendered from {source} by `python -m serve_app.serve_config {source}` (`make configs`).\n"
    "# Do not edit: change {source} and render again (a unit test fails on drift).\n"
    "# Deploy with: serve deploy {target}\n"
)


def render_file(source: Path, target: Path | None = None) -> str:
    """The rendered YAML of `source`, with a header naming it; the source's leading comment
    (what the config is) follows the header."""
    text = source.read_text()
    lead = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lead.append(line)
    comment = "".join(line + "\n" for line in lead)
    header = HEADER.format(source=source.as_posix(), target=(target or source).as_posix())
    body = yaml.safe_dump(render(yaml.safe_load(text)), sort_keys=False, width=100)
    return header + comment + body


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2):
        print("usage: python -m serve_app.serve_config SOURCE [TARGET]", file=sys.stderr)
        return 2
    source = Path(args[0])
    target = Path(args[1]) if len(args) == 2 else None
    text = render_file(source, target)
    if target is None:
        sys.stdout.write(text)
    else:
        target.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
