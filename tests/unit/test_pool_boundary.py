"""The typed boundary between the ingress and the pools: what crosses Ray, and how the
ingress turns a pool's answer into its own errors, health and metrics."""

from __future__ import annotations

import pickle

from orch.api.control import pool_health
from orch.api.errors import ErrorCode
from orch.api.pools import (
    Admission,
    CatalogBinding,
    PoolDetail,
    PoolError,
    PoolView,
    SubmitResult,
    TaskContext,
)
from orch.core.errors import OrchError
from orch.observability.exposition import render

PREP = {"pool_id": "a", "model_ref": "hf:o/r/m.gguf", "fetch_allowed": True, "steps": [], "reason": None, "how": None}


def view(**kw) -> PoolView:
    kw.setdefault("pool_id", "a")
    kw.setdefault("engine", "mock")
    kw.setdefault("model_ref", "mock-model")
    kw.setdefault("ready", True)
    return PoolView(**kw)


def test_answers_survive_pickling_as_ray_sends_them():
    for value in (view(vram_free_bytes=None), PoolDetail("a", chat_template="{{ x }}", counters={"started": 2}),
                  SubmitResult(admission=Admission("t1", "a", 0, 0, prompt_tokens=3)),
                  SubmitResult(error=PoolError(ErrorCode.ADMISSION_REJECT, "full", retriable=True, policy_label="reject")),
                  TaskContext(kv_warmth=True, budgets={"tokens": 5}), CatalogBinding("a", "hf:o/r/m.gguf", status="waiting")):
        assert pickle.loads(pickle.dumps(value)) == value


def test_pool_error_envelope_leaves_out_empty_fields():
    error = PoolError(ErrorCode.POOL_UNREADY, "not Ready", retriable=True, retry_after_ms=1000, pool_id="a")
    assert error.to_dict() == {"code": "POOL_UNREADY", "message": "not Ready", "retriable": True,
                               "retry_after_ms": 1000, "pool_id": "a"}


def test_pool_error_is_raised_as_the_same_orch_error():
    from orch.serve.pool_client import PreparationError, raised

    plain = raised(PoolError(ErrorCode.ADMISSION_REJECT, "queue full", retriable=True, retry_after_ms=250,
                             policy_label="reject", pool_id="a", engine="mock"))
    assert type(plain) is OrchError and plain.http_status == 429
    assert plain.to_dict() == {"code": "ADMISSION_REJECT", "message": "queue full", "engine": "mock", "pool_id": "a",
                               "retriable": True, "retry_after_ms": 250, "policy_label": "reject"}
    preparing = raised(PoolError(ErrorCode.POOL_UNREADY, "fetching", retriable=True, preparation=PREP))
    assert isinstance(preparing, PreparationError) and preparing.to_dict()["preparation"] == PREP


def test_held_pool_and_unknown_vram_in_health():
    body = pool_health(view(ready=False, waiting_for_model=True, vram_total_bytes=None, vram_free_bytes=None), None)
    assert body.metrics.vram_total_bytes is None and body.metrics.vram_free_bytes is None
    assert body.metrics.counters.started == 0
    live = pool_health(view(vram_total_bytes=8, vram_free_bytes=2), PoolDetail("a", counters={"started": 4}))
    assert live.metrics.vram_free_bytes == 2 and live.metrics.counters.started == 4


def test_metrics_leave_unknown_vram_out_and_count_from_the_detail():
    views = {"a": view(vram_total_bytes=10, vram_free_bytes=4), "b": view(pool_id="b", vram_total_bytes=None,
                                                                           vram_free_bytes=None)}
    details = {"a": PoolDetail("a", metrics={"enqueued": {"interactive": 3}}, queue_depth_by_priority={"batch": 1})}
    lines = render(views, details, {}).decode().splitlines()

    def samples(name: str, pool_id: str) -> list[str]:
        return [line for line in lines if line.startswith(name + "{") and f'pool_id="{pool_id}"' in line]

    assert [line.split()[-1] for line in samples("vram_used_bytes", "a")] == ["6.0"]
    assert samples("vram_used_bytes", "b") == [] and samples("slots_total", "b")
    assert [line.split()[-1] for line in samples("tasks_enqueued_total", "a")] == ["3.0"]
    assert [line.split()[-1] for line in samples("queue_depth", "a")] == ["1.0"]
