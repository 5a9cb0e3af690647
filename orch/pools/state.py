"""A pool's lifecycle: the states of orch/api/pool_state.py and the moves allowed between them.

    new ──► loading ──► ready ◄──► waiting / retired (held on the catalog's word)
     │         │          │              │
     └─► held  └─► load_failed ──► loading | held
                          └─► engine_failed ──► stopped      (any state ──► stopped)

A held pool with no engine loads when its model arrives (``loading``); one that still has
its engine (the catalog withdrew a loaded model) becomes ``ready`` again in place. A failed
engine is final: the supervisor replaces the actor. Draining is orthogonal to all of this
(``PoolCore.draining``): a draining pool keeps its state and runs what it has, and an
engine failure drains the pool as well as failing it. The snapshot's booleans (``ready``,
``loading``, ``engine_failed``, ``waiting_for_model``, ``model_retired``) are read from here.
"""

from __future__ import annotations

from typing import Optional

from orch.api.pool_state import PoolState
from orch.catalog import binding as bindings

S = PoolState
_HELD = frozenset({S.waiting, S.retired})

#: Where each state may go next (staying in the same state is always allowed).
ALLOWED: dict[PoolState, frozenset[PoolState]] = {
    S.new: frozenset({S.loading, S.waiting, S.retired, S.stopped}),
    S.loading: frozenset({S.ready, S.load_failed, S.stopped}),
    S.ready: frozenset({S.waiting, S.retired, S.engine_failed, S.stopped}),
    S.waiting: frozenset({S.loading, S.ready, S.retired, S.engine_failed, S.stopped}),
    S.retired: frozenset({S.loading, S.ready, S.waiting, S.engine_failed, S.stopped}),
    S.load_failed: frozenset({S.loading, S.waiting, S.retired, S.stopped}),
    S.engine_failed: frozenset({S.stopped}),
    S.stopped: frozenset(),
}

#: The catalog's binding statuses that hold a pool, and the state each one holds it in.
HOLDS: dict[str, PoolState] = {bindings.WAITING: S.waiting, bindings.RETIRED: S.retired}


class PoolStateError(RuntimeError):
    """A move the lifecycle does not allow: a bug in the pool, never a user's error."""


class Lifecycle:
    def __init__(self) -> None:
        self.state = PoolState.new

    def to(self, target: PoolState) -> None:
        if target is self.state:
            return
        if target not in ALLOWED[self.state]:
            raise PoolStateError(f"a pool cannot go from {self.state.value} to {target.value}")
        self.state = target

    @property
    def ready(self) -> bool:
        return self.state is S.ready

    @property
    def loading(self) -> bool:
        return self.state is S.loading

    @property
    def engine_failed(self) -> bool:
        return self.state is S.engine_failed

    @property
    def held(self) -> Optional[str]:
        """The binding status the pool holds on (bindings.WAITING or RETIRED), or None."""
        if self.state is S.waiting:
            return bindings.WAITING
        if self.state is S.retired:
            return bindings.RETIRED
        return None
