"""Prometheus text for the whole orchestrator, built at scrape time from the pools' views and
details and the ingress totals (the ingress is the single scrape target)."""

from __future__ import annotations

from typing import Any, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from orch.api.pools import PoolDetail, PoolView
from orch.observability.names import METRICS

HELP = {
    "tasks_enqueued_total": "Tasks admitted into a pool's queue.",
    "tasks_started_total": "Tasks that began running on a slot.",
    "tasks_canceled_total": "Tasks cancelled by a client.",
    "tasks_rejected_total": "Requests a pool refused, by error code.",
    "tasks_finished_total": "Tasks that ended, by outcome (end or the error code).",
    "admission_backpressure_events_total": "Queue-full events (429s and drop-lru evictions), by policy.",
    "tokens_in_total": "Prompt tokens read.",
    "tokens_out_total": "Tokens generated and streamed.",
    "queue_depth": "Tasks waiting in a pool's queue.",
    "slots_active": "Slots running a task.",
    "slots_total": "Slots of a pool.",
    "kv_cache_usage_ratio": "Share of the KV cache in use (slots in use / slots for in-process llama.cpp).",
    "gpu_utilization": "GPU utilisation reported by the pool (0 without GPUs).",
    "vram_used_bytes": "VRAM in use on the pool's devices.",
    "model_state": "1 for the model each pool serves, with its state.",
    "latency_first_token_ms": "Time from admission to the first token, milliseconds.",
    "latency_decode_ms": "Time from a task's start to its end, milliseconds.",
    "latency_first_token_split_ms": "A request's first-token time in parts, milliseconds: orchestrator (the ingress, "
                                    "Serve's HTTP path and the Ray hops), queue (waiting in the pool) and engine "
                                    "(the pool's start to its first token).",
    "placement_decisions_total": "Placement decisions by outcome, pin, fallback and reason (why the pool: "
                                 "pinned, session_affinity, preferred, fallback, prefix_overlap, least_loaded, "
                                 "round_robin; refused for refusals).",
    "prefix_hit_tokens_total": "Prompt tokens admitted that the pool's engine probably had in its prefix cache.",
    "prefix_miss_tokens_total": "Prompt tokens admitted that the pool's engine had to read (not cached).",
    "placement_candidates_considered": "Pools a placement decision considered.",
    "catalog_verifications_total": "Catalog digest verifications by result.",
    "models_loaded": "Models of the model set loaded now.",
    "model_loads_total": "Loads of models of the model set, by outcome (loaded, failed, refused, cancelled).",
    "model_evictions_total": "Models of the model set unloaded, by reason (lru, idle, operator, lost, removed).",
    "model_load_seconds": "Time from a model's load request to its pool being Ready, seconds.",
    "model_budget_bytes": "Memory a budget of the model set holds for its models.",
    "model_budget_used_bytes": "Memory of a budget the loaded (and loading) models take, as estimated.",
    "tenant_requests_total": "Tasks admitted for requests with an API key, by tenant (undeclared tenants: other).",
    "tenant_rejections_total": "Requests with an API key refused, by tenant and reason (the limit that refused: "
                               "rpm, tpm, concurrency, budget_day, budget_month; else the error code).",
    "tenant_tokens_in_total": "Prompt tokens of ended tasks with an API key, by tenant.",
    "tenant_tokens_out_total": "Completion tokens of ended tasks with an API key, by tenant.",
}


def _family(name: str) -> Metric:
    kind, labels = METRICS[name]
    base = name.removesuffix("_total") if kind == "counter" else name
    cls = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}[kind]
    return cls(base, HELP[name], labels=list(labels))


def _histogram(family: HistogramMetricFamily, labels: list[str], data: dict[str, Any]) -> None:
    cumulative, running = [], 0
    for bound, count in zip(data["buckets"], data["counts"]):
        running += count
        cumulative.append((str(float(bound)), running))
    running += data["counts"][-1]
    cumulative.append(("+Inf", running))
    family.add_metric(labels, cumulative, sum_value=data["sum"])


def families(views: dict[str, PoolView], details: dict[str, PoolDetail], ingress: dict[str, Any],
             catalog: dict[str, float]) -> list[Metric]:
    """Every series; a pool without a detail (it did not answer) has its gauges only."""
    out = {name: _family(name) for name in METRICS}
    for pool_id, view in sorted(views.items()):
        base = [pool_id, view.engine, view.engine_version, "0"]
        detail = details.get(pool_id)
        if detail is not None:
            _pool_counters(out, base, detail)
        slots = max(1, view.slots + view.reserve_slots)
        out["slots_active"].add_metric(base, view.active_slots)
        out["slots_total"].add_metric(base, view.slots)
        out["kv_cache_usage_ratio"].add_metric(base, view.active_slots / slots)
        device = view.device_mask or "cpu"
        out["gpu_utilization"].add_metric(base + [device], 0.0)
        if view.vram_used_bytes is not None:  # unknown VRAM is left out, not reported as 0
            out["vram_used_bytes"].add_metric(base + [device], view.vram_used_bytes)
        state = "Ready" if view.ready else ("Draining" if view.draining else "Unready")
        out["model_state"].add_metric([pool_id, view.model_ref, state], 1)
    for key, value in sorted((tuple(k), v) for k, v in ingress.get("decisions", [])):
        out["placement_decisions_total"].add_metric(list(key), value)
    if ingress.get("candidates"):
        _histogram(out["placement_candidates_considered"], [], ingress["candidates"])
    for part, data in sorted(ingress.get("split", {}).items()):
        _histogram(out["latency_first_token_split_ms"], [part], data)
    for result, value in sorted(catalog.items()):
        out["catalog_verifications_total"].add_metric([result], value)
    if ingress.get("models"):
        _models(out, ingress["models"])
    _tenants(out, ingress.get("tenants", {}))
    return list(out.values())


def _tenants(out: dict[str, Metric], tenants: dict[str, dict[str, Any]]) -> None:
    for tenant, usage in sorted(tenants.items()):
        out["tenant_requests_total"].add_metric([tenant], usage.get("requests", 0))
        out["tenant_tokens_in_total"].add_metric([tenant], usage.get("tokens_in", 0))
        out["tenant_tokens_out_total"].add_metric([tenant], usage.get("tokens_out", 0))
        for reason, count in sorted(usage.get("rejections_by_limit", {}).items()):
            out["tenant_rejections_total"].add_metric([tenant, reason], count)


def _models(out: dict[str, Metric], state: dict[str, Any]) -> None:
    """The model set's series, from its manager's state (orch/pools/demand.py)."""
    out["models_loaded"].add_metric([], sum(1 for m in state.get("models", []) if m.get("loaded")))
    metrics = state.get("metrics", {})
    for outcome, value in sorted(metrics.get("loads", {}).items()):
        out["model_loads_total"].add_metric([outcome], value)
    for reason, value in sorted(metrics.get("evictions", {}).items()):
        out["model_evictions_total"].add_metric([reason], value)
    if metrics.get("load_s"):
        _histogram(out["model_load_seconds"], [], metrics["load_s"])
    for budget in state.get("budgets", []):
        if budget.get("budget_bytes") is not None:
            out["model_budget_bytes"].add_metric([budget["id"]], budget["budget_bytes"])
        out["model_budget_used_bytes"].add_metric([budget["id"]], budget.get("used_bytes", 0))


def _pool_counters(out: dict[str, Metric], base: list[str], detail: PoolDetail) -> None:
    metrics = detail.metrics
    for name, key in (("tasks_enqueued_total", "enqueued"), ("tasks_started_total", "started"),
                      ("tasks_canceled_total", "canceled"), ("tasks_rejected_total", "rejected"),
                      ("tasks_finished_total", "finished"), ("admission_backpressure_events_total", "backpressure")):
        for label, value in sorted(metrics.get(key, {}).items()):
            out[name].add_metric(base + [label], value)
    tokens = metrics.get("tokens", {})
    out["tokens_in_total"].add_metric(base, tokens.get("in", 0))
    out["tokens_out_total"].add_metric(base, tokens.get("out", 0))
    for name, key in (("prefix_hit_tokens_total", "prefix_hit_tokens"), ("prefix_miss_tokens_total", "prefix_miss_tokens")):
        out[name].add_metric(base, detail.counters.get(key, 0))
    for priority, depth in sorted(detail.queue_depth_by_priority.items()):
        out["queue_depth"].add_metric(base + [priority], depth)
    for name, key in (("latency_first_token_ms", "first_token_ms"), ("latency_decode_ms", "decode_ms")):
        for priority, data in sorted(metrics.get(key, {}).items()):
            _histogram(out[name], base + [priority], data)


class _Snapshot:
    def __init__(self, metrics: Iterable[Metric]) -> None:
        self.metrics = list(metrics)

    def collect(self) -> Iterable[Metric]:
        return self.metrics


def render(views: dict[str, PoolView], details: dict[str, PoolDetail], ingress: dict[str, Any],
           catalog: dict[str, float] | None = None) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(families(views, details, ingress, catalog or {})))
    return generate_latest(registry)
