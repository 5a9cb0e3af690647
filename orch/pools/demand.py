"""Models on demand, the Ray side: one named actor per orchestrator owns the pools of the
configured model set (``model_set``, orch/config/model_set.py).

A request naming a model that is not loaded asks ``ensure``: one load per model (later asks
join it), after the planner (orch/core/model_set.py) has picked the budget and the idle,
unpinned models to unload first, least recently used first. The model's pool is created
holding, with a preparation plan that accepts tasks, so v2 tasks queue in it and see
``metrics`` frames with ``prep`` while it loads; ``ensure`` answers as soon as the pool
holds and the load goes on in the background, after a fetch when the catalog lacks the
model (orch/pools/demand_fetch.py); budgets are read at each load (demand_budget.py). The
loop unloads models whose keep_alive ran out and forgets pools that died (a later request
loads the model again). These pools are
not the supervisor's: the configured pools stay its own, and a model pool that fails is
unloaded, not restarted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Optional

import ray

from orch.actors import find_actor, singleton, stop_actor
from orch.api.errors import ErrorCode
from orch.api.pools import CatalogBinding, PoolView
from orch.config import OrchConfig, PoolConfig, parse_config, to_wire
from orch.config.model_set import ModelEntry, ModelSetConfig
from orch.core.errors import OrchError
from orch.core.model_set import LOADED, LOADING, UNLOADED, LoadBook, ModelRecord, NoRoom, expired, plan_load, used_bytes
from orch.observability.logs import configure_logging
from orch.pools.actor import actor_name
from orch.pools.catalog_watcher import CatalogWatcher
from orch.pools.demand_budget import measured_bytes, room
from orch.pools.demand_fetch import binding_for, fetched, fetched_size, holding
from orch.pools.spawn import create_pool_actor

log = logging.getLogger("orch.models")

ACTOR_NAME = "orch-models"
#: A pool that does not answer within this long is treated as gone.
CALL_TIMEOUT_S = 10.0
#: A pool's view that did not come this time (see ``ModelManager._view``).
UNANSWERED = object()
#: How long one load may take before it counts as failed.
LOAD_TIMEOUT_S = 900.0
#: Upper bounds (seconds) of the ``model_load_seconds`` buckets.
LOAD_BUCKETS_S = (0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900)


def pool_config(entry: ModelEntry, node_id: Optional[str] = None, gpu_memory_bytes: Optional[int] = None) -> PoolConfig:
    """The pool a model of the set loads in: named after the model, which is also its alias."""
    return PoolConfig(id=entry.id, engine=entry.engine, model=entry.ref, model_aliases=[entry.id],
                      num_gpus=entry.num_gpus, num_cpus=entry.num_cpus, allow_cpu=entry.num_gpus == 0,
                      slots=entry.slots, tenant_reserve_slots=entry.tenant_reserve_slots, ctx=entry.ctx,
                      threads=entry.threads, engine_options=entry.engine_options, node_id=node_id,
                      gpu_memory_bytes=gpu_memory_bytes)


@ray.remote(num_cpus=0, max_restarts=-1)
class ModelManager:
    def __init__(self, config: dict[str, Any]) -> None:
        configure_logging()
        self._configure(parse_config(config, "model manager config"))
        self.records: dict[str, ModelRecord] = {}
        self.book = LoadBook()
        self.loads: dict[str, asyncio.Task] = {}
        self.handles: dict[str, Any] = {}
        self.where: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, str] = {}
        #: Models whose pool is being stopped now: the busy check leaves them to ``unload``.
        self.unloading: set[str] = set()
        self.metrics: dict[str, Any] = {"loads": {}, "evictions": {},
                                        "load_s": {"buckets": list(LOAD_BUCKETS_S),
                                                   "counts": [0] * (len(LOAD_BUCKETS_S) + 1), "sum": 0.0}}
        self._lock = asyncio.Lock()
        self._loop_task: Optional[asyncio.Task] = None
        self._adopted = False

    def _configure(self, config: OrchConfig) -> None:
        assert config.model_set is not None
        self.config = config
        self.models: ModelSetConfig = config.model_set
        self.catalog = CatalogWatcher(config)
        self.budget_bytes = {b.id: measured_bytes(b) for b in self.models.budgets}

    def _record(self, model_id: str) -> ModelRecord:
        entry = self.models.model(model_id)
        record = self.records.get(model_id)
        if record is None:
            record = self.records[model_id] = ModelRecord(model_id, entry.estimate(), entry.pinned, entry.keep_alive,
                                                          entry.budget, gpu_count=entry.gpu_count())
        return record

    async def apply(self, config: dict[str, Any]) -> None:
        self._configure(parse_config(config, "model manager config"))
        for model_id in list(self.records):
            if model_id not in {m.id for m in self.models.models}:
                await self.unload(model_id, "removed")

    async def run(self) -> None:
        """Start the keep_alive loop (idempotent)."""
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._forever())

    async def _forever(self) -> None:
        if not self._adopted:
            await self._adopt()
        while True:
            try:
                await self._check()
            except Exception:  # one bad round must not end the loop
                log.exception("model check failed")
            await asyncio.sleep(self.models.check_every_s)

    async def _adopt(self) -> None:
        """After a restart of this actor: the model pools still running are loaded models."""
        self._adopted = True
        for entry in self.models.models:
            handle = find_actor(actor_name(entry.id), self.config.namespace)
            if handle is None or entry.id in self.handles:
                continue
            view = await self._view(entry.id, handle)
            if isinstance(view, PoolView) and view.ready:
                record = self._record(entry.id)
                record.state, record.loaded_in = LOADED, record.budget or sorted(self.budget_bytes)[0]
                record.since = record.last_used = time.time()
                self.handles[entry.id] = handle
                self.where[entry.id] = {"node_id": view.node_id, "gpus": view.device_mask}

    # -- what the ingress and operators ask ---------------------------------------------
    def state(self) -> dict[str, Any]:
        """Every model (loaded or not, where, since, last used, pinned) and every budget."""
        models = []
        for entry in self.models.models:
            record = self._record(entry.id)
            models.append({
                "id": entry.id, "ref": entry.ref, "engine": entry.engine.value, "pool_id": entry.id,
                "state": record.state, "loaded": record.state == LOADED, "pinned": record.pinned,
                "keep_alive": entry.keep_alive, "size_bytes": record.size_bytes, "budget": record.loaded_in,
                "since": record.since, "last_used": record.last_used, "busy": record.busy,
                **{key: self.where.get(entry.id, {}).get(key) for key in ("node_id", "gpus")},
                "last_error": self.errors.get(entry.id)})
        budgets = [{"id": name, "budget_bytes": total, "used_bytes": used_bytes(self.records.values(), name)}
                   for name, total in sorted(self.budget_bytes.items())]
        return {"models": models, "budgets": budgets, "metrics": self.metrics}

    async def report(self) -> dict[str, Any]:
        """``state()``, and the loop started if it is not running (after Ray restarted this actor)."""
        await self.run()
        return self.state()

    def touch(self, model_id: str) -> None:
        record = self.records.get(model_id)
        if record is not None and record.state == LOADED:
            record.last_used = time.time()

    async def pin(self, model_id: str, pinned: bool) -> dict[str, Any]:
        self._known(model_id)
        self._record(model_id).pinned = pinned
        return self._one(model_id)

    async def ensure(self, model_id: str) -> dict[str, Any]:
        """The model is loaded or loading when this returns (its pool exists and queues
        tasks); raises OrchError POOL_UNREADY when nothing can be evicted to make room."""
        self._known(model_id)
        async with self._lock:
            record = self._record(model_id)
            if record.state == LOADING:
                self.book.begin(model_id, time.monotonic())  # joins the load in flight
                return self._one(model_id)
            if record.state == LOADED:
                record.last_used = time.time()
                return self._one(model_id)
            await self._make_room(record)
            self.book.begin(model_id, time.monotonic())
            record.state, record.since, record.last_used = LOADING, time.time(), time.time()
            self.errors.pop(model_id, None)
            try:
                await self._create(record)
            except Exception as exc:
                handle = self.handles.pop(model_id, None)
                await self._failed(record, handle, f"the model's pool could not be created: {exc}")
                raise OrchError(ErrorCode.POOL_UNAVAILABLE, f"model '{model_id}' could not be loaded: {exc}",
                                retriable=True, retry_after_ms=1000) from None
        return self._one(model_id)

    async def wait(self, model_id: str, timeout_s: float) -> dict[str, Any]:
        """The model's state once its load is over, or when ``timeout_s`` ran out."""
        self._known(model_id)
        task = self.loads.get(model_id)
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout_s)
            except asyncio.TimeoutError:
                pass
        return self._one(model_id)

    async def load(self, model_id: str, timeout_s: float = LOAD_TIMEOUT_S) -> dict[str, Any]:
        await self.ensure(model_id)
        return await self.wait(model_id, timeout_s)

    async def unload(self, model_id: str, reason: str = "operator") -> dict[str, Any]:
        """Stop the model's pool (its queued and running tasks end with a retriable error)."""
        self._known(model_id)
        record = self._record(model_id)
        task = self.loads.get(model_id)
        if task is not None and not task.done():
            task.cancel()
        handle = self.handles.pop(model_id, None)
        if handle is not None:
            self.unloading.add(model_id)
            try:
                await _stop(handle)
            finally:
                self.unloading.discard(model_id)
        if record.state != UNLOADED:
            if record.state == LOADING:
                self._load_over(record, "cancelled", f"unloaded while loading ({reason})")
            self.metrics["evictions"][reason] = self.metrics["evictions"].get(reason, 0) + 1
            log.info("model %s unloaded (%s)", model_id, reason, extra={"pool_id": model_id})
        record.state, record.loaded_in, record.since, record.busy, record.gpus = UNLOADED, None, None, False, ()
        self.where.pop(model_id, None)
        return self._one(model_id)

    async def stop_all(self) -> list[str]:
        if self._loop_task is not None:
            self._loop_task.cancel()
        stopped = []
        for entry in self.models.models:
            handle = self.handles.pop(entry.id, None) or find_actor(actor_name(entry.id), self.config.namespace)
            if handle is not None:
                await _stop(handle)
                stopped.append(entry.id)
        return stopped

    # -- loading --------------------------------------------------------------------------
    async def _make_room(self, record: ModelRecord) -> None:
        """Unload what the planner names; refuse (503) when nothing can be evicted."""
        await self._refresh_busy()
        try:
            drain = self.models.drain_busy_s is not None
            rooms = {b.id: room(b, self.budget_bytes[b.id]) for b in self.models.budgets}
            plan = plan_load(record, list(self.records.values()), rooms, drain)
        except NoRoom as exc:  # too big for any budget: waiting will not help
            self._count("loads", "refused")
            raise OrchError(ErrorCode.POOL_UNREADY, str(exc), retriable=not exc.too_big,
                            retry_after_ms=None if exc.too_big else 5000, pool_id=record.id) from None
        for victim in plan.evict:
            if self.models.drain_busy_s is not None and self.records[victim].busy:
                await self._drain(victim, self.models.drain_busy_s)
                await self.unload(victim, "drained")
                continue
            if not await self._idle_now(victim):
                self._count("loads", "refused")
                raise OrchError(ErrorCode.POOL_UNREADY, f"model '{record.id}' needs the memory of model '{victim}', "
                                "which took work just now; retry shortly", retriable=True, retry_after_ms=2000,
                                pool_id=record.id)
            await self.unload(victim, "lru")
        record.loaded_in, record.gpus = plan.budget, plan.gpus

    async def _drain(self, model_id: str, seconds: float) -> None:
        """Stop the victim admitting; wait (up to ``seconds``, then its pool ends what is left)
        until its work is done."""
        handle = self.handles.get(model_id)
        if handle is None:
            return
        try:
            await asyncio.wait_for(handle.drain.remote(int(seconds * 1000)), CALL_TIMEOUT_S)
        except Exception:  # gone already
            return
        deadline = time.monotonic() + seconds + 2
        while time.monotonic() < deadline:
            view = await self._view(model_id, handle)
            if view is None or (view is not UNANSWERED and view.active_slots + view.queue_depth == 0):
                return
            await asyncio.sleep(0.1)

    async def _idle_now(self, model_id: str) -> bool:
        """Drain the victim, then look again: work admitted meanwhile keeps it loaded."""
        handle = self.handles.get(model_id)
        if handle is None:
            return True
        try:
            await asyncio.wait_for(handle.drain.remote(None), CALL_TIMEOUT_S)
        except Exception:  # gone already: nothing to keep
            return True
        view = await self._view(model_id, handle)
        if view is UNANSWERED or (view is not None and view.active_slots + view.queue_depth > 0):
            self.records[model_id].busy = True
            try:
                await asyncio.wait_for(handle.undrain.remote(), CALL_TIMEOUT_S)
            except Exception:
                pass
            return False
        return True

    async def _create(self, record: ModelRecord) -> None:
        entry = self.models.model(record.id)
        budget = self.models.budget(record.loaded_in) if record.loaded_in else None
        pool = pool_config(entry, budget.node_id if budget else None, budget.gpu_memory_bytes if budget else None)
        binding = await binding_for(self.catalog, pool)
        stale = find_actor(actor_name(pool.id), self.config.namespace)
        if stale is not None:  # a pool left from an earlier load that died half-way
            await _stop(stale)
        config = self.config.model_copy(update={"pools": [pool]})
        handle = create_pool_actor(pool, config)
        self.handles[record.id] = handle
        view = await asyncio.wait_for(handle.start.remote(holding(binding, pool.engine.value)), LOAD_TIMEOUT_S)
        self.loads[record.id] = asyncio.get_running_loop().create_task(
            self._finish_load(record, handle, binding, pool, view.node_id))

    async def _finish_load(self, record: ModelRecord, handle: Any, binding: CatalogBinding, pool: PoolConfig,
                           node_id: Optional[str]) -> None:
        if binding.held:  # not in the catalog yet: provisioned first, on the pool's node
            try:
                binding = await fetched(self.catalog, handle, binding, pool, node_id, LOAD_TIMEOUT_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self._failed(record, handle, f"fetching the model failed: {exc}")
                return
            if self.models.model(record.id).size_bytes is None:
                record.size_bytes = fetched_size(binding, pool.ctx, pool.slots) or record.size_bytes
        try:
            view: PoolView = await asyncio.wait_for(handle.bind.remote(binding), LOAD_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the pool died or hung while loading
            await self._failed(record, handle, f"the pool died while loading: {type(exc).__name__}")
            return
        if not view.ready:
            await self._failed(record, handle, view.last_error or "the model did not load")
            return
        record.state, record.since, record.last_used = LOADED, time.time(), time.time()
        self.where[record.id] = {"node_id": view.node_id, "gpus": view.device_mask}
        seconds = self._load_over(record, "loaded")
        log.info("model %s loaded in %.1f s", record.id, seconds, extra={"pool_id": record.id})

    async def _failed(self, record: ModelRecord, handle: Any, cause: str) -> None:
        self._load_over(record, "failed", cause)
        if handle is not None:
            if self.handles.get(record.id) is handle:
                self.handles.pop(record.id, None)
            await _stop(handle)
        record.state, record.loaded_in, record.since, record.gpus = UNLOADED, None, None, ()
        log.warning("model %s failed to load: %s", record.id, cause, extra={"pool_id": record.id})

    def _load_over(self, record: ModelRecord, outcome: str, cause: Optional[str] = None) -> float:
        seconds = self.book.end(record.id, time.monotonic())
        self._count("loads", outcome)
        if cause:
            self.errors[record.id] = cause[:500]
        if outcome == "loaded":
            hist = self.metrics["load_s"]
            index = next((i for i, bound in enumerate(LOAD_BUCKETS_S) if seconds <= bound), len(LOAD_BUCKETS_S))
            hist["counts"][index] += 1
            hist["sum"] += seconds
        return seconds

    def _count(self, kind: str, label: str) -> None:
        self.metrics[kind][label] = self.metrics[kind].get(label, 0) + 1

    # -- the loop: busy flags, lost pools, keep_alive ------------------------------------
    async def _check(self) -> None:
        await self._refresh_busy()
        for model_id in expired(list(self.records.values()), time.time()):
            async with self._lock:
                if model_id in expired([self.records[model_id]], time.time()) and await self._idle_now(model_id):
                    await self.unload(model_id, "idle")

    async def _refresh_busy(self) -> None:
        loaded = [r for r in self.records.values() if r.state == LOADED and r.id not in self.unloading]
        views = await asyncio.gather(*(self._view(r.id, self.handles.get(r.id)) for r in loaded))
        now = time.time()
        for record, view in zip(loaded, views):
            if view is UNANSWERED or record.id in self.unloading:  # an unload (its own reason) is under way
                continue
            if view is None:
                if self.handles.get(record.id) is not None or record.state == LOADED:
                    log.warning("model %s: its pool is gone; unloaded", record.id, extra={"pool_id": record.id})
                    self.errors[record.id] = "its pool was lost"
                    self.handles.pop(record.id, None)
                    await self.unload(record.id, "lost")
                continue
            record.busy = view.active_slots + view.queue_depth > 0
            if record.busy:
                record.last_used = now

    async def _view(self, model_id: str, handle: Any) -> Any:
        """The pool's view; None when its actor is dead; ``UNANSWERED`` when it did not answer
        this time (slow, restarting, an error in the call): that is no reason to unload it."""
        if handle is None:
            return None
        try:
            return await asyncio.wait_for(handle.snapshot.remote(), CALL_TIMEOUT_S)
        except ray.exceptions.ActorDiedError:
            return None
        except Exception as exc:
            log.warning("model %s: its pool did not answer (%s: %s); asking again next round", model_id,
                        type(exc).__name__, exc, extra={"pool_id": model_id})
            return UNANSWERED

    # -- helpers --------------------------------------------------------------------------
    def _known(self, model_id: str) -> None:
        if model_id not in {m.id for m in self.models.models}:
            known = ", ".join(m.id for m in self.models.models)
            raise OrchError(ErrorCode.NOT_FOUND, f"no model '{model_id}' in the model set; known: {known}")

    def _one(self, model_id: str) -> dict[str, Any]:
        return next(m for m in self.state()["models"] if m["id"] == model_id)


async def _stop(handle: Any) -> None:
    try:
        await asyncio.wait_for(handle.shutdown.remote(), CALL_TIMEOUT_S)
    except Exception:  # a wedged or dead pool is killed regardless
        pass
    try:
        ray.kill(handle, no_restart=True)
    except Exception:
        pass
    deadline = time.monotonic() + CALL_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            await handle.config_digest.remote()
        except Exception:
            return
        await asyncio.sleep(0.05)


# -- the manager's lifecycle ---------------------------------------------------------------
def ensure_models(config: OrchConfig):
    """Get or create the model manager for a config with a model set (None without one).
    Blocking: call off the loop."""
    if config.model_set is None:
        return None
    clash = {m.id for m in config.model_set.models} & {p.id for p in config.pools}
    if clash:
        from orch.config import ConfigError

        raise ConfigError(f"model_set: model ids {sorted(clash)} are also pool ids; a model's id names its pool")
    wire = to_wire(config)
    manager = singleton(ModelManager, ACTOR_NAME, config.namespace, wire, max_concurrency=100)
    ray.get(manager.apply.remote(wire))
    ray.get(manager.run.remote())
    return manager


def stop_models(namespace: str) -> None:
    stop_actor(ACTOR_NAME, namespace, "stop_all")
