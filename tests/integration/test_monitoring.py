"""The dashboard and the alerts meet a real Prometheus.

Debian's Prometheus scrapes a local stack's Ray metrics port (what the PodMonitor scrapes on
KubeRay) while requests of two tenants on both tiers, streamed and not, some failing and some
refused, run through it. Then every dashboard query (its variables substituted as Grafana would),
every alert expression and every recording rule must return series, and Prometheus must evaluate
every rule without error. GPU panels need a GPU, cost panels GPU time: without them, Prometheus
must still accept their queries. (tests/integration/test_rules.py checks the values and alerts
of the SLO and cost rules with `promtool test rules`.)
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests import monitoring, prometheus
from tests.helpers import wait_for
from tests.monitoring import GRAFANA_VALUES, Query

from .conftest import Stack, local_config

KEYS = {"team-a": "sk-team-a-0123456789abcdef", "team-b": "sk-team-b-0123456789abcdef"}
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
LOAD_S = 30
HAS_GPU = shutil.which("nvidia-smi") is not None


@pytest.fixture(scope="module")
def promtool() -> None:
    reason = prometheus.install()
    if reason is not None:
        pytest.skip(f"no Prometheus to test against: {reason}")


def test_promtool_accepts_the_rule_groups(promtool: None, tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(monitoring.rule_groups()))
    checked = prometheus.check_rules(path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {monitoring.rule_count(monitoring.rule_groups())} rules found" in (
        checked.stdout
    )


@pytest.fixture(scope="module")
def scraped(
    promtool: None, ray_head: Stack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[prometheus.Prometheus]:
    """Prometheus scraping a stack with tenants and autoscaled tiers, after a run of load."""
    keys = [
        {"name": "team-a", "key": KEYS["team-a"]},
        {"name": "team-b", "key": KEYS["team-b"], "tiers": ["small"]},
    ]
    workdir = tmp_path_factory.mktemp("prometheus")
    (workdir / "keys.yaml").write_text(yaml.safe_dump(keys))
    config = local_config()
    args = config["applications"][0]["args"]
    args["router"]["api_keys"] = {"file": str(workdir / "keys.yaml")}
    for tier in args["tiers"]:
        # autoscaled (so that the engines' queues are reported), never past one replica here
        tier["replicas"] = {"min": 1, "max": 2}
        tier["scaling"] = {"target_per_replica": 1000}
    ray_head.deploy(config)
    server = prometheus.Prometheus(
        workdir, [f"127.0.0.1:{ray_head.head.metrics_port}"], monitoring.rule_groups()
    )
    try:
        asyncio.run(load(ray_head.url, LOAD_S))
        yield server
    finally:
        server.stop()


async def load(url: str, seconds: float) -> None:
    """Four callers for `seconds`: both tenants, both tiers, streamed and not; each round also
    has a prompt too long for the engine (a failed request, 400) and a tier a key may not use."""
    deadline = time.monotonic() + seconds

    async def caller(client: httpx.AsyncClient, tenant: str, tier: str, stream: bool) -> None:
        headers = {"authorization": f"Bearer {KEYS[tenant]}"}
        body = {"model": tier, "messages": QUESTION, "max_tokens": 8, "stream": stream}
        while time.monotonic() < deadline:
            reply = await client.post("/v1/chat/completions", json=body, headers=headers)
            assert reply.status_code == 200, reply.text
            too_long = [{"role": "user", "content": "word " * 3500}]
            reply = await client.post(
                "/v1/chat/completions",
                json={**body, "messages": too_long, "stream": False},
                headers=headers,
            )
            assert reply.status_code == 400, reply.text  # the engine's 422, in OpenAI's shape
            refused = {**body, "model": "large"}
            reply = await client.post("/v1/chat/completions", json=refused, headers=headers)
            assert reply.status_code == (403 if tenant == "team-b" else 200), reply.text

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        await asyncio.gather(
            caller(client, "team-a", "small", True),
            caller(client, "team-a", "large", False),
            caller(client, "team-b", "small", False),
            caller(client, "team-b", "small", True),
        )


def returns_series(server: prometheus.Prometheus, query: Query) -> list[dict[str, object]]:
    """The query's series, waiting for Ray's exporter and the scrapes to catch up."""
    found: list[dict[str, object]] = []

    def has_series() -> bool:
        found[:] = server.query(query.expr)
        return bool(found)

    wait_for(has_series, 60, f"series from {query.name}: {query.expr}")
    return found


def skip_without_optional_inputs(server: prometheus.Prometheus, query: Query) -> None:
    """Skips, once Prometheus has run the query, where it needs GPU time or a price of a GPU-hour
    and the stack exports none."""
    for metric in query.optional_inputs:
        if not server.query(metric):
            server.query(query.expr)  # Prometheus parses and runs it
            pytest.skip(f"this stack exports no {metric} (its tiers have no GPU, or no price)")


DASHBOARD_QUERIES = monitoring.panel_queries(monitoring.dashboard(), GRAFANA_VALUES)


@pytest.mark.parametrize("query", DASHBOARD_QUERIES, ids=[q.name for q in DASHBOARD_QUERIES])
def test_dashboard_query_returns_series(scraped: prometheus.Prometheus, query: Query) -> None:
    if query.needs_gpu and not HAS_GPU:
        scraped.query(query.expr)  # Prometheus parses and runs it
        pytest.skip("no GPU here: Ray exports its node GPU metrics only for GPUs it sees")
    skip_without_optional_inputs(scraped, query)
    assert returns_series(scraped, query)


def test_dashboard_variables_list_every_tier(scraped: prometheus.Prometheus) -> None:
    for name, (metric, label) in monitoring.variable_queries(monitoring.dashboard()).items():
        values = scraped.api(f"label/{label}/values", **{"match[]": metric})
        assert set(values) >= {"small", "large"}, (name, values)


ALERTS = monitoring.alert_queries(monitoring.rule_groups())


@pytest.mark.parametrize("alert", ALERTS, ids=[a.name for a in ALERTS])
def test_alert_expression_returns_series(scraped: prometheus.Prometheus, alert: Query) -> None:
    """Each alert's condition, as 0/1 per series, is computed from real series."""
    signal = Query(alert.name, monitoring.as_signal(alert.expr))
    series = returns_series(scraped, signal)
    assert {s["value"][1] for s in series} <= {"0", "1"}, series


RECORDS = monitoring.record_queries(monitoring.rule_groups())


@pytest.mark.parametrize("record", RECORDS, ids=[r.name for r in RECORDS])
def test_recording_rule_records_series(scraped: prometheus.Prometheus, record: Query) -> None:
    """What Prometheus recorded from the real series: a share between 0 and 1 for the SLOs."""
    skip_without_optional_inputs(scraped, record)
    series = returns_series(scraped, Query(record.name, record.name))
    if "ratio" in record.name:
        assert all(0 <= float(s["value"][1]) <= 1 for s in series), series
        assert {s["metric"]["tier"] for s in series} >= {"small", "large"}


def test_prometheus_evaluates_every_rule(scraped: prometheus.Prometheus) -> None:
    def evaluated() -> bool:
        rules = [r for g in scraped.api("rules")["groups"] for r in g["rules"]]
        return len(rules) == monitoring.rule_count(monitoring.rule_groups()) and all(
            r["health"] == "ok" and r["lastEvaluation"] > "2000" for r in rules
        )

    wait_for(evaluated, 30, "every rule evaluated without error")
    assert not [
        r["name"] for g in scraped.api("rules")["groups"] for r in g["rules"] if r.get("lastError")
    ]
