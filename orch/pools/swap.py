"""Changing a loaded pool's model in place, by an operator's reload or by the catalog's
new binding, through one swap: dispatch pauses (new tasks still queue), running tasks
finish, the new engine loads next to the current one, and only then is the current one
closed. On any failure the current engine was never touched and dispatch resumes on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

from orch.api.errors import ErrorCode
from orch.api.pool_state import PoolState
from orch.api.pools import CatalogBinding, PoolView
from orch.catalog import binding as bindings
from orch.config import PoolConfig
from orch.engines.base import Engine, EngineError
from orch.pools.core import PoolCore
from orch.pools.preparation import Preparation

log = logging.getLogger("orch.pool")

#: How long a swap waits for in-flight tasks before giving up (and keeping the current model).
RELOAD_IDLE_TIMEOUT_S = 60.0

#: Starts a pool that never loaded (PoolManager.start; ``unhold``: load whatever held it).
Starter = Callable[..., Awaitable[PoolView]]


def new_engine(core: PoolCore, binding: Optional[CatalogBinding]) -> Engine:
    """The engine for the pool's model, with the catalog's file when ``binding`` names one."""
    config: PoolConfig = core.config
    if config.model != core.model_ref:  # an operator's reload changed the model
        config = config.model_copy(update={"model": core.model_ref})
    if binding is None or binding.status != bindings.READY:
        return core.engine_factory(config)
    return core.engine_factory(config, binding)


class ModelSwap:
    def __init__(self, core: PoolCore, prep: Preparation, start: Starter) -> None:
        self.core = core
        self.prep = prep
        self.start = start
        self.lock = asyncio.Lock()

    @asynccontextmanager
    async def _paused(self) -> AsyncIterator[None]:
        self.core.dispatch_open.clear()
        try:
            yield
        finally:
            self.core.dispatch_open.set()
            self.core.wake()

    async def _load_beside(self, build: Callable[[], Engine], idle_timeout_s: float) -> Engine:
        """Wait (dispatch paused) for the running tasks, then load the new engine; raises
        EngineError when the tasks did not finish in time, or whatever the load raised."""
        core = self.core
        deadline = time.monotonic() + idle_timeout_s
        while core.active_slots > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if core.active_slots > 0:
            raise EngineError(f"in-flight tasks did not finish within {idle_timeout_s:.0f} s")
        engine = build()
        await core.loop.run_in_executor(core.executor, engine.load)
        return engine

    async def _switch(self, engine: Engine) -> None:
        old, self.core.engine = self.core.engine, engine
        self.core.counts.add("reloads")
        await self.core.loop.run_in_executor(self.core.executor, old.close)

    # -- the catalog's binding -----------------------------------------------------------
    async def bind(self, binding: CatalogBinding) -> None:
        """Take a new catalog binding in place (queued tasks stay): hold, adopt what is
        loaded already, or swap to the file it names. A failed engine only records it."""
        async with self.lock:
            await self._bind(binding)

    async def _bind(self, binding: CatalogBinding) -> None:
        core = self.core
        status = binding.status
        if core.life.engine_failed:  # the supervisor replaces this actor; nothing loads here
            core.binding = binding
            return
        same_file = self._already_loaded(binding)
        if status in (bindings.WAITING, bindings.RETIRED):
            self._hold_loaded(binding)
        elif binding.load_key == core.loaded_key or (core.loaded_key is None and status == bindings.LOCAL) \
                or same_file:
            if same_file:
                core.loaded_key = binding.load_key
            self.prep.take_binding(binding)
            core.preparation = None
            core.life.to(PoolState.ready)
        else:
            await self._swap_binding(binding)

    def _already_loaded(self, binding: CatalogBinding) -> bool:
        """The binding names exactly the file the engine has loaded, in this process (an
        operator's reload resolved the same model): adopt it, loading nothing again."""
        if binding.status != bindings.READY or not binding.model_path:
            return False
        if binding.engine_url or binding.engine_binary or binding.runtime_env:
            return False
        loaded = getattr(self.core.engine, "model_path", None) or getattr(self.core.engine, "model_dir", None)
        try:
            return loaded is not None and Path(loaded).resolve() == Path(binding.model_path).resolve()
        except OSError:
            return False

    def _hold_loaded(self, binding: CatalogBinding) -> None:
        """A loaded model the catalog no longer offers (retired, removed): stop admitting and
        end what is queued (retriably; another pool may serve it); running tasks finish."""
        core = self.core
        core.preparation = None
        self.prep.take_binding(binding)
        ended = core.end_tasks(ErrorCode.POOL_UNAVAILABLE, f"pool '{core.pool_id}' stopped serving its model "
                               f"before this task ran: {binding.note}")
        core.counts.add("failed", ended)
        log.warning("pool %s holds: %s", core.pool_id, binding.note, extra={
            "pool_id": core.pool_id, "human": f"Pool {core.pool_id} stopped serving: {binding.note}"})

    async def _swap_binding(self, binding: CatalogBinding, idle_timeout_s: float = RELOAD_IDLE_TIMEOUT_S) -> None:
        """Swap to what the new binding names; on any failure keep the current engine and
        mark the binding failed (the supervisor restarts the pool)."""
        core = self.core
        old_binding = core.binding
        async with self._paused():
            try:
                core.binding = binding  # a round that looks meanwhile sees this binding as taken
                engine = await self._load_beside(lambda: new_engine(core, binding), idle_timeout_s)
            except Exception as exc:  # whatever failed, the current engine keeps serving
                core.binding = (old_binding or CatalogBinding(core.pool_id, core.model_ref)).but(
                    failed_key=binding.load_key)
                core.last_error = f"binding the catalog's model failed: {exc}"
                core.counts.add("reload_rollbacks")
                log.error("pool %s: %s", core.pool_id, core.last_error)
                return
            core.loaded_key = binding.load_key
            self.prep.take_binding(binding)
            core.preparation = None
            core.life.to(PoolState.ready)
            core.last_error = None
            await self._switch(engine)
            log.info("pool %s bound to %s (%s)", core.pool_id, binding.model_path or binding.engine_url,
                     binding.model_digest)

    # -- an operator's reload ------------------------------------------------------------
    async def reload(self, new_model_ref: str, idle_timeout_s: float = RELOAD_IDLE_TIMEOUT_S) -> dict[str, Any]:
        """Swap the model atomically: Ready on the new model, or still Ready on the old one."""
        async with self.lock:
            return await self._reload(new_model_ref, idle_timeout_s)

    async def _reload(self, new_model_ref: str, idle_timeout_s: float) -> dict[str, Any]:
        core = self.core
        old_ref = core.model_ref
        if core.engine is None:
            return await self._first_load(new_model_ref)
        config = core.config.model_copy(update={"model": new_model_ref})
        async with self._paused():
            try:
                engine = await self._load_beside(lambda: core.engine_factory(config), idle_timeout_s)
            except (EngineError, OSError, ValueError) as exc:
                return self._rolled_back(old_ref, str(exc))
            core.model_ref, core.model_aliases, core.model_digest = new_model_ref, (), None
            core.binding, core.loaded_key = None, None  # the catalog's binding described the previous model
            core.draining = False
            await self._switch(engine)
            log.info("pool %s reloaded: %s -> %s", core.pool_id, old_ref, new_model_ref)
            return {"pool_id": core.pool_id, "reloaded": True, "rolled_back": False, "model_ref": new_model_ref,
                    "previous_model_ref": old_ref, "engine_version": engine.version, "ctx_max": engine.ctx_max}

    async def _first_load(self, new_model_ref: str) -> dict[str, Any]:
        """A pool that never loaded takes the new model as its first."""
        core = self.core
        core.config = core.config.model_copy(update={"model": new_model_ref})
        core.model_ref, core.model_aliases = new_model_ref, ()
        core.binding = None  # the catalog's binding described the previous model
        snapshot = await self.start(None, unhold=True)
        if not snapshot.ready:
            return {"pool_id": core.pool_id, "reloaded": False, "rolled_back": False, "model_ref": new_model_ref,
                    "error": core.last_error}
        return {"pool_id": core.pool_id, "reloaded": True, "rolled_back": False, "model_ref": new_model_ref}

    def _rolled_back(self, old_ref: str, cause: str) -> dict[str, Any]:
        self.core.counts.add("reload_rollbacks")
        log.warning("pool %s: reload failed (%s); still serving %s", self.core.pool_id, cause, old_ref)
        return {"pool_id": self.core.pool_id, "reloaded": False, "rolled_back": True, "model_ref": old_ref,
                "error": f"reload failed: {cause}; rolled back, still serving {old_ref}"}
