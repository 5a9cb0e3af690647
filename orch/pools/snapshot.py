"""What a pool says about itself: its view (small; placement reads it several times a
second from every ingress replica) and its detail (metrics, chat template, binding; read
on demand, or when the view's ``model_version`` moved on)."""

from __future__ import annotations

from typing import Optional

from orch.api.pool_state import PoolState
from orch.api.pools import PoolDetail, PoolSnapshot, PoolView
from orch.api.tasks import Priority
from orch.catalog import binding as bindings
from orch.engines.base import Engine
from orch.pools.core import PoolCore


def view(core: PoolCore, node_id: Optional[str] = None, runtime_env_key: Optional[str] = None) -> PoolView:
    """``node_id`` and ``runtime_env_key``: where the actor runs and what it was started with
    (the supervisor compares the key with the binding's)."""
    engine, life = core.engine, core.life
    total, free = vram(core)
    return PoolView(
        pool_id=core.pool_id,
        replica_set=core.config.replica_set or core.pool_id,
        engine=core.engine_name,
        engine_version=engine.version if engine else "",
        model_ref=core.model_ref,
        model_aliases=core.model_aliases,
        model_digest=core.model_digest,
        model_id=core.binding.model_id if core.binding is not None else None,
        ready=life.ready,
        state=life.state,
        waiting_for_model=life.state is PoolState.waiting,
        model_retired=life.state is PoolState.retired,
        queues_while_loading=engine is None and life.loading and bindings.accepts_tasks(core.preparation),
        draining=core.draining,
        drained=core.draining and len(core.queue) == 0 and core.active_slots == 0,
        workloads=workloads(engine),
        slots=core.config.slots,
        reserve_slots=core.config.reserve_slots,
        active_slots=core.active_slots,
        queue_depth=len(core.queue),
        queue_capacity=core.queue.capacity,
        queue_policy=core.queue.policy.value,
        ctx_max=engine.ctx_max if engine and life.ready else 0,
        max_tokens_out=core.config.max_tokens_out,
        vram_total_bytes=total,
        vram_free_bytes=free,
        device_mask=core.device_mask,
        last_error=error_text(core),
        loading=life.loading,
        engine_failed=life.engine_failed,
        service_ms=round(core.service_ms, 1),
        node_id=node_id,
        runtime_env_key=runtime_env_key,
        model_version=core.model_version,
        has_chat_template=bool(engine is not None and engine.chat_template),
        prefix_hashes=core.prefix.report() if life.ready else b"",
        prefix_source=core.prefix.source if life.ready else "",
        prefill_ms_per_token=round(core.prefix.prefill_ms_per_token, 4),
        bytes_per_token=round(core.prefix.bytes_per_token, 3),
    )


def detail(core: PoolCore) -> PoolDetail:
    engine = core.engine
    return PoolDetail(
        pool_id=core.pool_id,
        model_version=core.model_version,
        chat_template=engine.chat_template if engine else None,
        special_tokens=dict(engine.special_tokens) if engine else {},
        binding=core.binding,
        preparation=core.preparation,
        queue_depth_by_priority={p.value: core.queue.depth(p) for p in Priority},
        metrics=core.metrics.to_dict(),
        counters={**core.counts.to_dict(), "prefix_hit_tokens": core.prefix.hit_tokens,
                  "prefix_miss_tokens": core.prefix.miss_tokens},
    )


def report(core: PoolCore, node_id: Optional[str] = None, runtime_env_key: Optional[str] = None) -> PoolSnapshot:
    return PoolSnapshot(view(core, node_id, runtime_env_key), detail(core))


def vram(core: PoolCore) -> tuple[Optional[int], Optional[int]]:
    """Total and free VRAM of the pool's GPUs; None for both when they cannot be read
    (unknown, which placement must not take for "none free")."""
    engine = core.engine
    try:
        measured = core.gpu_memory.read(engine.memory_needed() if engine is not None else 0)
    except Exception:  # a probe must never break the snapshot
        measured = None
    return measured if measured is not None else (None, None)


def error_text(core: PoolCore) -> Optional[str]:
    """The pool's last error, with the supervisor's note (failures, the next restart) while
    the pool is not Ready: once a restart recovered it, the note is history, not news."""
    note = None if core.life.ready else core.supervision_note
    if core.last_error and note:
        return f"{core.last_error} ({note})"
    return core.last_error or note


def workloads(engine: Optional[Engine]) -> tuple[str, ...]:
    if engine is None:
        return ("completion",)
    return tuple(name for name, served in (("completion", engine.serves_completions),
                                           ("embedding", engine.serves_embeddings)) if served)
