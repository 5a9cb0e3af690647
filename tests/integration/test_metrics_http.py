"""``/metrics`` over real HTTP: the names and label sets of the contract, bounded labels,
and values that follow what the pools did."""

from __future__ import annotations

import time

import httpx
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from orch.observability.names import METRICS
from orch.pools.actor import pool_handle
from tests.conftest import home_config, read_sse

pytestmark = pytest.mark.integration

NAMESPACE = "orch-metrics-it"


@pytest.fixture(scope="module")
def client(deploy) -> httpx.Client:
    config = home_config(queue={"capacity": 2, "policy": "reject"})
    config["namespace"] = NAMESPACE
    return deploy(config, name="orch-metrics-it", route_prefix="/met")


def scrape(client: httpx.Client) -> dict[str, list]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(family.name, []).append(sample)
    return samples


def value(samples, family: str, sample_name: str, **labels) -> float:
    return sum(s.value for s in samples.get(family, []) if s.name == sample_name
               and all(s.labels.get(k) == v for k, v in labels.items()))


def test_names_and_label_sets_match_the_contract(client):
    task_ids = []
    for seed in range(3):
        response = client.post("/v2/tasks", json={"prompt": "Once upon a time", "max_tokens": 6, "seed": seed})
        if response.status_code == 202:
            task_ids.append(response.json()["task_id"])
    for task_id in task_ids:
        with client.stream("GET", f"/v2/tasks/{task_id}/events") as stream:
            read_sse(stream)
    time.sleep(1.5)  # one flush of the ingress-side counters
    text = client.get("/metrics").text
    samples = scrape(client)
    for family, rows in samples.items():
        exposed = family + "_total" if family + "_total" in METRICS else family
        assert exposed in METRICS, f"{exposed} is not in the metric contract"
        kind, labels = METRICS[exposed]
        for sample in rows:
            names = set(sample.labels) - {"le"}
            assert names == set(labels), (exposed, sample.labels)
    for task_id in task_ids:
        assert task_id not in text  # no task ids in labels
    assert "Once upon" not in text


def test_values_follow_the_work(client):
    before = scrape(client)
    enqueued = value(before, "tasks_enqueued", "tasks_enqueued_total", pool_id="default")
    tokens = value(before, "tokens_out", "tokens_out_total", pool_id="default")
    response = client.post("/v2/tasks", json={"prompt": "Once upon a time", "max_tokens": 5, "seed": 1})
    assert response.status_code == 202
    with client.stream("GET", f"/v2/tasks/{response.json()['task_id']}/events") as stream:
        events = read_sse(stream)
    streamed = sum(1 for _, kind, _ in events if kind == "token")

    # Fill the small queue to get 429s, counted as backpressure and rejections.
    blockers = [client.post("/v2/tasks", json={"prompt": "Once upon a time", "max_tokens": 200}) for _ in range(5)]
    refused = sum(1 for r in blockers if r.status_code == 429)
    assert refused >= 1
    time.sleep(1.5)
    after = scrape(client)
    assert value(after, "tasks_enqueued", "tasks_enqueued_total", pool_id="default") >= enqueued + 1
    assert value(after, "tokens_out", "tokens_out_total", pool_id="default") >= tokens + streamed
    assert value(after, "admission_backpressure_events", "admission_backpressure_events_total", policy="reject") >= refused
    assert value(after, "tasks_rejected", "tasks_rejected_total", reason="ADMISSION_REJECT") >= refused
    assert value(after, "latency_first_token_ms", "latency_first_token_ms_count", priority="interactive") >= 1
    assert value(after, "placement_decisions", "placement_decisions_total", outcome="placed", pinned="false") >= 1
    # The streamed task's first-token time, split into orchestrator, queue and engine.
    for part in ("orchestrator", "queue", "engine"):
        split = ("latency_first_token_split_ms", "latency_first_token_split_ms_count")
        assert value(after, *split, part=part) >= value(before, *split, part=part) + 1, part
    assert value(after, "model_state", "model_state", pool_id="default", state="Ready") == 1
    for blocker in blockers:
        if blocker.status_code == 202:
            client.post(f"/v2/tasks/{blocker.json()['task_id']}/cancel")


def test_the_pool_replays_its_series_into_ray_metrics(client):
    """The key series also go to ray.util.metrics from inside the pool actor (Ray's metrics
    export and dashboard), growing by what the pool did."""
    response = client.post("/v2/tasks", json={"prompt": "Once upon a time", "max_tokens": 3, "seed": 2})
    with client.stream("GET", f"/v2/tasks/{response.json()['task_id']}/events") as stream:
        read_sse(stream)
    pool = pool_handle("default", NAMESPACE)
    status = ray.get(pool.ray_metrics_status.remote(export_now=True))
    counters = ray.get(pool.detail.remote()).metrics
    assert status is not None and status["exports"] >= 1
    exported = {key: total for key, total in status["totals"].items() if key.startswith("orch_tasks_enqueued_total")}
    assert exported, status
    assert sum(exported.values()) == sum(counters["enqueued"].values()) >= 1
    assert all("'pool_id': 'default'" in key for key in exported)
