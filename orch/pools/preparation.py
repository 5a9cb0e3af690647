"""The catalog's word on a pool's model (orch/catalog/binding.py) and the preparation plan
(orch/api/preparation.py) a pool shows while it waits for that model.

A pool whose model is not present yet holds instead of failing: it is not Ready, says why,
and, when the model is on its way, queues tasks without running them. Their streams get
``metrics`` events with the preparation's progress (``prep``) until the pool is Ready.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from orch.api.pools import CatalogBinding
from orch.api.preparation import PrepStatus, PrepStep
from orch.catalog import binding as bindings
from orch.pools.core import PoolCore
from orch.pools.frames import Frames
from orch.pools.state import HOLDS


class Preparation:
    def __init__(self, core: PoolCore, frames: Frames) -> None:
        self.core = core
        self.frames = frames

    def take_binding(self, binding: CatalogBinding) -> bool:
        """Adopt the catalog's word on this pool's model (no loading here). True: it holds
        the pool (now ``waiting`` or ``retired``); otherwise the caller moves the pool on."""
        core = self.core
        status = binding.status
        was_held = core.life.held is not None
        core.binding = binding
        core.model_digest = binding.model_digest if status in (bindings.READY, bindings.RETIRED) else None
        if status in HOLDS:
            core.life.to(HOLDS[status])
            core.last_error = binding.note
            prep = binding.preparation
            if prep is None and core.preparation is None:
                prep = bindings.preparation(binding, core.engine_name, fetch_allowed=False,
                                            blocked_reason="the model catalog has not been consulted yet")
            if prep is not None:
                self.set(prep)
            return True
        if was_held:
            core.last_error = None
        return False

    def set(self, prep: Optional[dict[str, Any]]) -> None:
        """The supervisor's view of the preparation (fetch progress from the catalog); the
        pool's own warm-up step is kept. Waiting tasks get a ``metrics`` event on a change."""
        core = self.core
        if prep is None or (core.engine is not None and not core.life.held):
            return
        current = core.preparation
        if current is not None:
            mine = bindings.step_of(current, PrepStep.pool_warmup)
            if mine["status"] != PrepStatus.pending.value:
                prep = bindings.with_step(prep, PrepStep.pool_warmup, PrepStatus(mine["status"]), mine["pct"],
                                          mine.get("detail"))
        if prep == current:
            return
        core.preparation = prep
        self._push()

    def step(self, step: PrepStep, status: PrepStatus, pct: float, detail: Optional[str] = None) -> None:
        if self.core.preparation is not None:
            self.core.preparation = bindings.with_step(self.core.preparation, step, status, pct, detail)
            self._push()

    def _push(self) -> None:
        core = self.core
        for task_id in list(core.deferred):
            record = core.tasks.get(task_id)
            if record is not None and not record.terminal:
                now = time.monotonic()
                record.metrics_at = now
                frame = self.frames.metrics(record, now).model_copy(update={"prep": core.preparation})
                record.push("metrics", frame.payload())

    def done(self) -> None:
        """The model is loaded: the preparation is over (its last event says so)."""
        if self.core.preparation is not None:
            self.step(PrepStep.pool_warmup, PrepStatus.done, 100, "ready")
        self.core.preparation = None
