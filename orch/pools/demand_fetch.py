"""Models on demand: the catalog's part of a load. A model of the set whose ref is not in the
catalog yet (``hf:``, ``https:``) is provisioned first, with the catalog's own provisioning
task (the one a configured pool that waits for its model gets, orch/pools/catalog_watcher.py),
and its pool shows the fetch's progress in its preparation plan (``prep`` in the ``metrics``
frames of the tasks queued in it) before the load itself.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Optional

from orch.api.pools import CatalogBinding
from orch.api.preparation import PrepStatus, PrepStep
from orch.catalog import binding as bindings
from orch.config import PoolConfig, project_root
from orch.core.model_set import read_shape
from orch.pools.catalog_watcher import CatalogWatcher

#: Seconds between two looks at the catalog while a model is fetched.
FOLLOW_EVERY_S = 0.25
#: Seconds a preparation-plan update may take before the pool counts as gone.
CALL_TIMEOUT_S = 10.0


def fetching(binding: CatalogBinding) -> bool:
    """The model is not here, and the orchestrator may fetch it itself."""
    return binding.status == bindings.WAITING and bool((binding.preparation or {}).get("fetch_allowed"))


async def binding_for(catalog: CatalogWatcher, pool: PoolConfig) -> CatalogBinding:
    """The catalog's binding for a model pool: ready, local, or waiting for a fetch the policy
    allows; anything else cannot load and raises RuntimeError (why, and how to provide it)."""
    await catalog.refresh([pool.model])
    found = catalog.binding(pool.id, pool.engine.value, pool.model)
    if found is None:  # the catalog is not reachable: a local file still loads
        found = bindings.resolve(pool.id, pool.engine.value, pool.model, [], [], project_root())
    if found.held and not fetching(found):
        reason = (found.preparation or {}).get("reason") or found.note or "the model is not present"
        raise RuntimeError(f"{reason}; {bindings.how_to_provide(found.model_ref)}")
    return found


def holding(binding: CatalogBinding, engine: str) -> CatalogBinding:
    """The binding a new model pool starts on: it holds, and queues tasks while the model is
    fetched (the catalog's plan) or loaded (a plan whose fetch is done)."""
    if fetching(binding):
        return binding.but(note="fetching the model on demand", load_key=f"hold-{binding.load_key}")
    prep = bindings.preparation(binding, engine, fetch_allowed=False)
    prep = dict(prep, reason=None, how=None)
    return binding.but(status=bindings.WAITING, note="loading the model on demand", preparation=prep,
                       load_key=f"hold-{binding.load_key}")


async def fetched(catalog: CatalogWatcher, handle: Any, binding: CatalogBinding, pool: PoolConfig,
                  node_id: Optional[str], timeout_s: float) -> CatalogBinding:
    """Have the catalog provision the model and pass its progress on to the waiting pool;
    the binding once the catalog holds the model. Raises RuntimeError when the fetch fails,
    TimeoutError past ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    shown = binding.preparation
    while time.monotonic() < deadline:
        await catalog.fetch_for(binding, pool.model, node_id)  # once; later calls are no-ops
        await asyncio.sleep(FOLLOW_EVERY_S)
        await catalog.refresh([pool.model])
        found = catalog.binding(pool.id, pool.engine.value, pool.model)
        if found is None:
            continue
        if not found.held:  # the plan the tasks see next says the fetch is done
            done = bindings.preparation(found, pool.engine.value, fetch_allowed=True)
            await asyncio.wait_for(handle.set_preparation.remote(done), CALL_TIMEOUT_S)
            return found
        prep = found.preparation
        if prep is not None and prep != shown:
            await asyncio.wait_for(handle.set_preparation.remote(prep), CALL_TIMEOUT_S)
            shown = prep
        step = bindings.step_of(prep, PrepStep.model_fetch) if prep else {}
        if step.get("status") in (PrepStatus.failed.value, PrepStatus.blocked.value):
            raise RuntimeError(prep.get("reason") or f"fetching {found.model_ref} failed")
        binding = found
    raise TimeoutError(f"fetching {binding.model_ref} took longer than {timeout_s:g} s")


def fetched_size(binding: CatalogBinding, ctx: int, slots: int) -> Optional[int]:
    """The fit estimate of a model the catalog just fetched (unknown before)."""
    if not binding.model_path:
        return None
    try:
        return read_shape(binding.model_path).estimate(ctx, slots)
    except OSError:
        return None
