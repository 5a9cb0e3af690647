"""The ``model_set`` section: models loaded when a request names them, the memory budgets
they share, and how long idle ones stay.

Each model becomes a pool (its id is the pool's id and an alias of its model) that exists
only while the model is loaded. A model whose estimated size (orch/core/model_set.py) is
larger than every budget is refused here, with the numbers, instead of at request time.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from pydantic import Field, field_validator, model_validator

from orch.api.tasks import ID_PATTERN, Engine
from orch.config.base import Strict
from orch.core.model_ref import ModelRefError, parse_ref
from orch.core.model_set import ModelRecord, Room, estimate_for_ref, fmt_bytes, too_big

#: Engines a model of the set can run on (they load in a pool actor).
MODEL_ENGINES = (Engine.llamacpp, Engine.vllm, Engine.mock)


class ModelEntry(Strict):
    id: str = Field(pattern=ID_PATTERN)
    #: Model reference: catalog id, ``hf:``, ``file:``, ``pkg:`` or a path (orch/core/model_ref.py).
    ref: str = Field(min_length=1)
    engine: Engine = Engine.llamacpp
    #: Context per slot.
    ctx: int = Field(default=2048, ge=64)
    slots: int = Field(default=1, ge=1, le=256)
    #: As a pool's ``tenant_reserve_slots`` (orch/config/schema.py).
    tenant_reserve_slots: Optional[int] = Field(default=None, ge=0, le=64)
    #: Never evicted; still unloaded by an operator's unload.
    pinned: bool = False
    #: Seconds an idle model stays loaded: 0 unloads it as soon as it is idle, -1 never.
    keep_alive: float = Field(default=300, ge=-1)
    #: Which budget the model loads into (a budget's id); none: the first with room.
    budget: Optional[str] = Field(default=None, pattern=ID_PATTERN)
    num_gpus: float = Field(default=0, ge=0)
    num_cpus: float = Field(default=1, ge=0)
    threads: Optional[int] = Field(default=None, ge=1, le=512)
    engine_options: dict[str, Any] = Field(default_factory=dict)
    #: Bytes the model needs, when the estimate from its file is wrong or unknown (a remote ref).
    size_bytes: Optional[int] = Field(default=None, ge=1)
    #: This model's own ``max_load_wait_s`` (a large model that takes longer to load).
    max_load_wait_s: Optional[float] = Field(default=None, gt=0, le=3600)

    @field_validator("ref")
    @classmethod
    def _parsable(cls, value: str) -> str:
        try:
            parse_ref(value)
        except ModelRefError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("engine")
    @classmethod
    def _loadable(cls, value: Engine) -> Engine:
        if value not in MODEL_ENGINES:
            raise ValueError(f"engine '{value.value}' cannot load on demand; supported: "
                             + ", ".join(e.value for e in MODEL_ENGINES))
        return value

    def gpu_count(self) -> int:
        """GPUs the model spans: ``num_gpus``, or vLLM's ``tensor_parallel_size`` when larger."""
        if self.num_gpus <= 0:
            return 0
        tp = self.engine_options.get("tensor_parallel_size") if self.engine == Engine.vllm else None
        return max(math.ceil(self.num_gpus), tp if isinstance(tp, int) and tp > 0 else 1)

    def estimate(self) -> Optional[int]:
        """Bytes the model needs loaded (weights + KV for ctx x slots, reserve included); None
        when unknown."""
        if self.size_bytes is not None:
            return self.size_bytes
        return estimate_for_ref(self.ref, self.ctx, self.slots + (self.tenant_reserve_slots or 0))


class BudgetConfig(Strict):
    """Memory models share: one node's RAM (CPU models) or a group of GPUs."""

    id: str = Field(default="local", pattern=ID_PATTERN)
    #: Bytes the loaded models may take together; none: the GPUs' memory (NVML, else
    #: ``gpus`` x ``gpu_memory_bytes``), or the host's RAM for CPU models.
    budget_bytes: Optional[int] = Field(default=None, ge=1)
    gpus: int = Field(default=0, ge=0, le=64)
    gpu_memory_bytes: Optional[int] = Field(default=None, ge=1)
    #: Ray node id the budget's models run on; none: wherever Ray places them.
    node_id: Optional[str] = Field(default=None, pattern=r"^[0-9a-f]{56}$")

    def declared_bytes(self) -> Optional[int]:
        """The budget as configured (None: measured where the manager runs)."""
        if self.budget_bytes is not None:
            return self.budget_bytes
        if self.gpus and self.gpu_memory_bytes:
            return self.gpus * self.gpu_memory_bytes
        return None

    def per_gpu_bytes(self) -> tuple[int, ...]:
        """Each GPU's declared bytes (() when not declared: measured with NVML at load)."""
        return (self.gpu_memory_bytes,) * self.gpus if self.gpus and self.gpu_memory_bytes else ()

    def declared_room(self) -> Optional[Room]:
        """The budget as the planner sees it, when the config says all of it."""
        if self.gpus and not self.gpu_memory_bytes:  # per-GPU figures are measured at load
            return Room(self.budget_bytes) if self.budget_bytes is not None else None
        total = self.declared_bytes()
        return Room(total, self.per_gpu_bytes()) if total is not None else None


class ModelSetConfig(Strict):
    models: list[ModelEntry] = Field(min_length=1)
    budgets: list[BudgetConfig] = Field(default_factory=lambda: [BudgetConfig()], min_length=1)
    #: Seconds an OpenAI request waits for its model to load before a 503 POOL_UNREADY.
    max_load_wait_s: float = Field(default=120, gt=0, le=3600)
    #: Seconds between two checks of idle models (keep_alive) and of lost pools.
    check_every_s: float = Field(default=0.5, gt=0, le=60)
    #: A busy model may be evicted when nothing idle makes room: it stops admitting and its
    #: queued and running work gets this many seconds to finish (what is left then ends with a
    #: retriable error). None: a busy model is never evicted.
    drain_busy_s: Optional[float] = Field(default=None, gt=0, le=3600)

    @model_validator(mode="after")
    def _consistent(self) -> "ModelSetConfig":
        for what, items in (("model", self.models), ("budget", self.budgets)):
            seen: set[str] = set()
            for item in items:
                if item.id in seen:
                    raise ValueError(f"{what} id '{item.id}' appears twice; {what} ids must be unique")
                seen.add(item.id)
        budgets = {b.id: b for b in self.budgets}
        for index, model in enumerate(self.models):
            if model.budget is not None and model.budget not in budgets:
                raise ValueError(f"models[{index}].budget: no budget '{model.budget}'; budgets: "
                                 + ", ".join(budgets))
            self._fits(index, model, budgets)
        return self

    @staticmethod
    def _fits(index: int, model: ModelEntry, budgets: dict[str, BudgetConfig]) -> None:
        """A model larger than every budget it may use can never load: refuse the config."""
        needed = model.estimate()
        candidates = [budgets[model.budget]] if model.budget else list(budgets.values())
        rooms = [b.declared_room() for b in candidates]
        if needed is None or any(room is None for room in rooms):
            return
        target = ModelRecord(model.id, needed, gpu_count=model.gpu_count())
        if all(too_big(target, room) for room in rooms):
            named = ", ".join(f"'{b.id}' {fmt_bytes(room.total)}"
                              + (f" ({b.gpus} GPUs of {fmt_bytes(b.gpu_memory_bytes)})" if room.per_gpu else "")
                              for b, room in zip(candidates, rooms))
            reserve = model.tenant_reserve_slots or 0
            reserved = f" + {reserve} reserved for tenants" if reserve else ""
            spans = (f", {fmt_bytes(math.ceil(needed / target.gpu_count))} on each of {target.gpu_count} GPUs"
                     if target.gpu_count > 1 else "")
            raise ValueError(
                f"models[{index}] '{model.id}' needs about {fmt_bytes(needed)} (weights + KV for ctx {model.ctx} x "
                f"{model.slots} slots{reserved}{spans}) but no budget holds it ({named}); use a smaller ctx, fewer slots, "
                "a smaller model, or a larger budget")

    def model(self, model_id: str) -> ModelEntry:
        for model in self.models:
            if model.id == model_id:
                return model
        raise KeyError(model_id)

    def budget(self, budget_id: str) -> BudgetConfig:
        for budget in self.budgets:
            if budget.id == budget_id:
                return budget
        raise KeyError(budget_id)
