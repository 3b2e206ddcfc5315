"""The dashboard's GPU panels on a real GPU host: Ray's node reporter exports utilisation and
memory per GPU, and a real Prometheus scraping Ray's metrics port answers every GPU query with
one series per GPU."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack import localstack
from devstack.local_ray import Head
from tests import monitoring, prometheus
from tests.helpers import wait_for

from .conftest import gpu_uuids

GPU_QUERIES = [
    q
    for q in monitoring.panel_queries(monitoring.dashboard(), monitoring.GRAFANA_VALUES)
    if q.needs_gpu
]


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[prometheus.Prometheus]:
    reason = prometheus.install()
    if reason is not None:
        pytest.skip(f"no Prometheus to test against: {reason}")
    head = localstack.start_head(Head.private(num_gpus=len(gpu_uuids())), localstack.ray_env())
    workdir: Path = tmp_path_factory.mktemp("prometheus")
    server = prometheus.Prometheus(workdir, [f"127.0.0.1:{head.metrics_port}"], {"groups": []})
    try:
        yield server
    finally:
        server.stop()
        localstack.stop_head(head)


@pytest.mark.needs_gpus(1)
@pytest.mark.parametrize("query", GPU_QUERIES, ids=[q.name for q in GPU_QUERIES])
def test_gpu_panel_has_a_series_per_gpu(
    scraped: prometheus.Prometheus, query: monitoring.Query
) -> None:
    wait_for(
        lambda: len(scraped.query(query.expr)) == len(gpu_uuids()),
        90,
        f"one series per GPU from {query.name}: {query.expr}",
    )
