"""Operator contract: pool health, drain, reload, purge."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field


class PoolCounters(BaseModel):
    enqueued: int = 0
    started: int = 0
    completed: int = 0
    cancelled: int = 0
    rejected: int = 0
    failed: int = 0
    dropped: int = 0
    purged: int = 0
    reloads: int = 0
    reload_rollbacks: int = 0


class PoolMetrics(BaseModel):
    queue_depth: int
    queue_capacity: int
    queue_policy: str
    slots: int
    active_slots: int
    service_ms: float = Field(description="moving average of one task's run time")
    vram_total_bytes: int = 0
    vram_free_bytes: int = 0
    device_mask: Optional[str] = Field(default=None, description="the GPUs Ray granted the pool (ids on its node)")
    counters: PoolCounters


class PoolHealth(BaseModel):
    """A pool's state as an operator sees it."""

    pool_id: str
    live: bool = Field(description="the pool actor answers")
    ready: bool = Field(description="the model is loaded and the pool admits work")
    draining: bool
    drained: bool = Field(description="draining and nothing left queued or running")
    last_error: Optional[str] = None
    engine: str
    engine_version: str
    model_ref: str
    model_digest: Optional[str] = None
    ctx_max: int
    workloads: list[str]
    metrics: PoolMetrics


class DrainRequest(BaseModel):
    """``POST /v2/pools/{id}/drain`` body (optional)."""

    model_config = ConfigDict(extra="forbid")

    deadline_ms: Optional[int] = Field(
        default=None, ge=1, le=24 * 3600 * 1000,
        description="after this long, work still queued or running ends with a retriable error; none: wait",
    )


class DrainAccepted(BaseModel):
    """202 body of a drain: the pool stopped admitting and is finishing its work."""

    pool_id: str
    draining: bool
    queued: int
    active: int
    deadline_ms: Optional[int] = None


class ReloadRequest(BaseModel):
    """``POST /v2/pools/{id}/reload`` body."""

    model_config = ConfigDict(extra="forbid")

    new_model_ref: str = Field(min_length=1, max_length=2048)


class ReloadResult(BaseModel):
    """200 body of a reload: Ready on the new model."""

    pool_id: str
    reloaded: bool
    rolled_back: bool
    model_ref: str
    previous_model_ref: Optional[str] = None
    engine_version: Optional[str] = None
    ctx_max: Optional[int] = None


class PurgeResult(BaseModel):
    """202 body of a purge: queued tasks removed (each told so on its stream)."""

    pool_id: str
    purged_queued: int
    forgotten_finished: int
    running: int


def health_from_snapshot(snap: dict[str, Any], live: bool = True) -> PoolHealth:
    return PoolHealth(
        pool_id=snap["pool_id"],
        live=live,
        ready=snap["ready"],
        draining=snap.get("draining", False),
        drained=snap.get("drained", False),
        last_error=snap.get("last_error"),
        engine=snap["engine"],
        engine_version=snap.get("engine_version", ""),
        model_ref=snap["model_ref"],
        model_digest=snap.get("model_digest"),
        ctx_max=snap.get("ctx_max", 0),
        workloads=list(snap.get("workloads", ("completion",))),
        metrics=PoolMetrics(
            queue_depth=snap.get("queue_depth", 0),
            queue_capacity=snap.get("queue_capacity", 0),
            queue_policy=snap.get("queue_policy", ""),
            slots=snap.get("slots", 0),
            active_slots=snap.get("active_slots", 0),
            service_ms=snap.get("service_ms", 0.0),
            vram_total_bytes=snap.get("vram_total_bytes", 0),
            vram_free_bytes=snap.get("vram_free_bytes", 0),
            device_mask=snap.get("device_mask"),
            counters=PoolCounters(**snap.get("counters", {})),
        ),
    )
