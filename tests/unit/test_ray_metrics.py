"""The Ray-metrics exporter replays the pool's counters as growth, and the Grafana
dashboard only queries series the exporter defines."""

from __future__ import annotations

import json
import re

from orch.api.pools import PoolDetail, PoolSnapshot, PoolView
from orch.config import project_root
from orch.observability.pool_metrics import PoolMetrics


class FakeMetric:
    def __init__(self, name, **_):
        self.name = name
        self.values: list[tuple[float, dict]] = []

    def inc(self, value, tags=None):
        self.values.append((value, tags))

    def set(self, value, tags=None):
        self.values.append((value, tags))

    def observe(self, value, tags=None):
        self.values.append((value, tags))


def test_counters_grow_by_the_difference_only(monkeypatch):
    from ray.util import metrics

    for cls in ("Counter", "Gauge", "Histogram"):
        monkeypatch.setattr(metrics, cls, FakeMetric)
    from orch.observability.ray_metrics import RayMetricsExporter

    pool = PoolMetrics()
    view = PoolView(pool_id="p", engine="mock", model_ref="mock-model", ready=True, active_slots=1)

    def snapshot():
        return PoolSnapshot(view, PoolDetail("p", queue_depth_by_priority={"interactive": 2}, metrics=pool.to_dict()))

    exporter = RayMetricsExporter(snapshot)
    pool.enqueued.inc("interactive", 3)
    pool.first_token("interactive", 30)
    exporter.export_once()
    pool.enqueued.inc("interactive", 2)
    pool.first_token("interactive", 700)
    exporter.export_once()
    exporter.export_once()
    enqueued = [v for v, _ in exporter.counters["tasks_enqueued_total"].values]
    assert enqueued == [3, 2]
    assert sorted(v for v, _ in exporter.first_token.values) == [50, 1000]  # each at its bucket's bound


def test_grafana_dashboard_queries_exported_series():
    dashboard = json.loads((project_root() / "deployments" / "grafana-llama-orch.json").read_text())
    source = (project_root() / "orch" / "observability" / "ray_metrics.py").read_text()
    defined = set(re.findall(r'"orch_([a-z_]+)"', source)) | {
        f"{name}" for name in re.findall(r'\("([a-z_]+_total)", "', source)}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs
    for expr in exprs:
        for series in re.findall(r"orch_([a-z_]+?)(?:_bucket)?\b[\[{)]", expr):
            assert series in defined, series
