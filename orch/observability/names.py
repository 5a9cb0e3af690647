"""Every Prometheus series the orchestrator exports, with its type and label names.

This list is the contract: ``/metrics`` must expose exactly these names with exactly these
label sets (a test checks it), and no label ever carries a task id, a session id or text,
so cardinality stays bounded by the number of pools, priorities and codes.
"""

from __future__ import annotations

#: Buckets (milliseconds) of time from admission to the first token: queue wait included,
#: since that is what a client waits for.
FIRST_TOKEN_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
#: Buckets (milliseconds) of one part of a request's first-token time (orchestrator, queue,
#: engine): fine at the low end, where the orchestrator's own milliseconds are.
SPLIT_BUCKETS_MS = (0.5, 1, 2, 3, 5, 7.5, 10, 15, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
#: Buckets (milliseconds) of time from a task's start to its end.
DECODE_BUCKETS_MS = (10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000, 300000)

POOL = ("pool_id", "engine", "engine_version", "replica_id")

METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tasks_enqueued_total": ("counter", POOL + ("priority",)),
    "tasks_started_total": ("counter", POOL + ("priority",)),
    "tasks_canceled_total": ("counter", POOL + ("priority",)),
    "tasks_rejected_total": ("counter", POOL + ("reason",)),
    "tasks_finished_total": ("counter", POOL + ("outcome",)),
    "admission_backpressure_events_total": ("counter", POOL + ("policy",)),
    "tokens_in_total": ("counter", POOL),
    "tokens_out_total": ("counter", POOL),
    "queue_depth": ("gauge", POOL + ("priority",)),
    "slots_active": ("gauge", POOL),
    "slots_total": ("gauge", POOL),
    "kv_cache_usage_ratio": ("gauge", POOL),
    "gpu_utilization": ("gauge", POOL + ("device",)),
    "vram_used_bytes": ("gauge", POOL + ("device",)),
    "model_state": ("gauge", ("pool_id", "model_id", "state")),
    "latency_first_token_ms": ("histogram", POOL + ("priority",)),
    "latency_decode_ms": ("histogram", POOL + ("priority",)),
    "latency_first_token_split_ms": ("histogram", ("part",)),
    "placement_decisions_total": ("counter", ("outcome", "pinned", "fallback", "reason")),
    "prefix_hit_tokens_total": ("counter", POOL),
    "prefix_miss_tokens_total": ("counter", POOL),
    "placement_candidates_considered": ("histogram", ()),
    "catalog_verifications_total": ("counter", ("result",)),
    # Models on demand (model_set): per budget, bounded by the config.
    "models_loaded": ("gauge", ()),
    "model_loads_total": ("counter", ("outcome",)),
    "model_evictions_total": ("counter", ("reason",)),
    "model_load_seconds": ("histogram", ()),
    "model_budget_bytes": ("gauge", ("budget",)),
    "model_budget_used_bytes": ("gauge", ("budget",)),
    # Per tenant: declared tenants by name, every other one as "other" (bounded by the config).
    "tenant_requests_total": ("counter", ("tenant",)),
    "tenant_rejections_total": ("counter", ("tenant", "reason")),
    "tenant_tokens_in_total": ("counter", ("tenant",)),
    "tenant_tokens_out_total": ("counter", ("tenant",)),
}

#: Buckets of the number of pools a placement decision considered.
CANDIDATE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
