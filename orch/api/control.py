"""Operator contract: pool health, drain, reload, purge."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from orch.api.pools import PoolDetail, PoolView


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
    #: Prompt tokens admitted that the engine probably had cached, and those it had not.
    prefix_hit_tokens: int = 0
    prefix_miss_tokens: int = 0


class PoolMetrics(BaseModel):
    queue_depth: int
    queue_capacity: int
    queue_policy: str
    slots: int
    reserve_slots: int = Field(default=0, description="slots only a tenant with nothing running may take")
    active_slots: int
    service_ms: float = Field(description="moving average of one task's run time")
    vram_total_bytes: Optional[int] = Field(default=0, description="0 without GPUs; null: unknown (the probe failed)")
    vram_free_bytes: Optional[int] = Field(default=0, description="0 without GPUs; null: unknown (the probe failed)")
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


def pool_health(view: PoolView, detail: Optional[PoolDetail], live: bool = True) -> PoolHealth:
    """The operator's health body from a pool's view and (when it answered) its detail."""
    return PoolHealth(
        pool_id=view.pool_id,
        live=live,
        ready=view.ready,
        draining=view.draining,
        drained=view.drained,
        last_error=view.last_error,
        engine=view.engine,
        engine_version=view.engine_version,
        model_ref=view.model_ref,
        model_digest=view.model_digest,
        ctx_max=view.ctx_max,
        workloads=list(view.workloads),
        metrics=PoolMetrics(
            queue_depth=view.queue_depth,
            queue_capacity=view.queue_capacity,
            queue_policy=view.queue_policy,
            slots=view.slots,
            reserve_slots=view.reserve_slots,
            active_slots=view.active_slots,
            service_ms=view.service_ms,
            vram_total_bytes=view.vram_total_bytes,
            vram_free_bytes=view.vram_free_bytes,
            device_mask=view.device_mask,
            counters=PoolCounters(**(detail.counters if detail is not None else {})),
        ),
    )
