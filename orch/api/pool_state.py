"""A pool's lifecycle state, one value at a time (orch/pools/state.py holds its transitions).

``waiting`` and ``retired`` hold the pool on the catalog's word (orch/catalog/binding.py):
its model is not present yet, or no longer offered. A held pool may still have an engine
loaded (its running tasks finish) but admits nothing it would run now. Draining is not a
state: it is an operator's flag on top of any state (a draining pool still runs its tasks).
"""

from __future__ import annotations

from enum import Enum


class PoolState(str, Enum):
    #: Created, not started yet.
    new = "new"
    #: Loading its model (the first load; a swap keeps the pool ``ready``).
    loading = "loading"
    #: Loaded and admitting.
    ready = "ready"
    #: Its model is not present yet (being prepared, or waiting for an operator).
    waiting = "waiting"
    #: Its model was retired from the catalog.
    retired = "retired"
    #: Loading failed; the supervisor restarts it.
    load_failed = "load_failed"
    #: The engine failed while serving; the supervisor restarts it.
    engine_failed = "engine_failed"
    #: Stopped for good.
    stopped = "stopped"
