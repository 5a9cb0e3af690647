"""The pool supervisor: one named actor per orchestrator that keeps the configured pools
running.

It reconciles the configured pools (replica sets already expanded by the config) with the
pool actors that exist: creates the missing ones, watches each (a snapshot call with a
timeout), and restarts a dead pool, or one whose engine failed to load or failed at run
time, after an exponential backoff. A circuit breaker (orch/core/supervision.py) stops a
restart storm: the pool stays Unready and says why. Ray decides where a pool lands from
its resources (``num_gpus``, ``num_cpus``, custom ``resources``), so a pool whose node dies
comes back on another node that has the capacity.

It also binds pools to the catalog (orch/catalog/watcher.py, orch/catalog/binding.py): a
pool whose model is not present yet holds ("waiting for model"), which is not a failure and
never counts against the restart policy; when the catalog gets the model (provisioned, or
handed off) the pool is bound in place, without a restart, and becomes Ready; a retired model
makes the pools serving it hold; a handed-off engine whose runtime_env differs replaces the
actor. Tasks queued in a waiting pool trigger the model's fetch when the policy allows it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Optional

import ray

from orch.catalog import binding as bindings
from orch.catalog.watcher import CatalogWatcher
from orch.config import OrchConfig, parse_config
from orch.core.supervision import RestartPolicy, RestartState

log = logging.getLogger("orch.supervisor")

ACTOR_NAME = "orch-supervisor"
#: Seconds between two reconcile rounds.
RECONCILE_EVERY_S = 0.5
#: A pool that does not answer a snapshot within this long is treated as dead.
PING_TIMEOUT_S = 10.0
#: How long one start (model load) may take before the pool counts as failed.
START_TIMEOUT_S = 900.0


@ray.remote(num_cpus=0, max_restarts=-1)
class Supervisor:
    def __init__(self, config: dict[str, Any]) -> None:
        from orch.observability.logs import configure_logging

        configure_logging()
        self.config: OrchConfig = parse_config(config, "supervisor config")
        self.policy = RestartPolicy(**self.config.supervision.policy())
        self.states: dict[str, RestartState] = {}
        self.starting: dict[str, asyncio.Task] = {}
        #: Pools this supervisor has seen running: one that vanishes has failed.
        self.seen: set[str] = set()
        #: Pools whose current actor's failure is already counted (once per actor).
        self.counted: set[str] = set()
        self._loop_task: Optional[asyncio.Task] = None
        self._round = asyncio.Lock()
        self.catalog = CatalogWatcher(self.config)
        self._catalog_refresh: Optional[asyncio.Task] = None
        #: The model each pool serves now (an operator's reload may have changed it).
        self.models: dict[str, str] = {}
        #: The last binding computed per pool, for status().
        self.bindings: dict[str, dict[str, Any]] = {}

    async def apply(self, config: dict[str, Any]) -> None:
        """Take a new configuration; pools whose config changed are replaced."""
        self.config = parse_config(config, "supervisor config")
        self.catalog.configure(self.config)
        self.policy = RestartPolicy(**self.config.supervision.policy())
        for state in self.states.values():
            state.policy = self.policy
        await self.reconcile()

    async def run(self) -> None:
        """Start the reconcile loop (idempotent)."""
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._forever())

    async def _forever(self) -> None:
        while True:
            try:
                await self.reconcile()
            except Exception:  # one bad round must not end supervision
                log.exception("reconcile round failed")
            await asyncio.sleep(RECONCILE_EVERY_S)

    async def reconcile(self) -> dict[str, Any]:
        async with self._round:
            self._refresh_catalog()
            await asyncio.gather(*(self._reconcile_pool(pool.id) for pool in self.config.pools))
        return self.status()

    def _refresh_catalog(self) -> None:
        """Read the catalog in the background: a slow or restarting catalog actor never
        delays supervision; rounds bind with the newest view there is (none at first)."""
        if self._catalog_refresh is None or self._catalog_refresh.done():
            models = [self.models.get(pool.id, pool.model) for pool in self.config.pools]
            self._catalog_refresh = asyncio.get_running_loop().create_task(self.catalog.refresh(models))

    def _binding(self, pool, model: Optional[str] = None) -> Optional[dict[str, Any]]:
        """What the catalog says ``pool`` loads (None: not known this round)."""
        found = self.catalog.binding(pool.id, pool.engine.value, model or pool.model,
                                     attached_url=pool.engine_options.get("base_url"))
        if found is not None:
            self.bindings[pool.id] = found
        return found

    @staticmethod
    def _binding_changed(snap: dict[str, Any], binding: dict[str, Any]) -> bool:
        actual = snap.get("binding")
        if actual is None:  # started without the catalog's word: only a non-local binding is news
            return binding["status"] != bindings.LOCAL
        return actual.get("load_key") != binding["load_key"] or actual.get("status") != binding["status"]

    @staticmethod
    def _bind_failed(snap: dict[str, Any], binding: dict[str, Any]) -> bool:
        return (snap.get("binding") or {}).get("failed_key") == binding["load_key"]

    @staticmethod
    def _runtime_env_changed(snap: dict[str, Any], binding: dict[str, Any]) -> bool:
        return snap.get("runtime_env_key") != binding.get("runtime_env_key")

    async def _prepare(self, handle, snap: dict[str, Any], binding: Optional[dict[str, Any]], model: str) -> None:
        """A pool that holds: keep its preparation plan current and, when tasks wait for the
        model and the policy allows, have it fetched."""
        if binding is None or binding["status"] not in (bindings.WAITING, bindings.RETIRED):
            return
        prep = binding.get("preparation")
        if prep is not None and _without_warmup(prep) != _without_warmup(snap.get("preparation")):
            try:
                await asyncio.wait_for(handle.set_preparation.remote(prep), PING_TIMEOUT_S)
            except (ray.exceptions.RayActorError, asyncio.TimeoutError):
                return
        if binding["status"] == bindings.WAITING and snap.get("queue_depth", 0) > 0 and not snap.get("engine") == "external":
            await self.catalog.fetch_for(binding, model, snap.get("node_id"))

    def _state(self, pool_id: str) -> RestartState:
        if pool_id not in self.states:
            self.states[pool_id] = RestartState(policy=self.policy)
        return self.states[pool_id]

    async def _reconcile_pool(self, pool_id: str) -> None:
        from orch.pools.actor import actor_name, config_digest, create_pool_actor

        if pool_id in self.starting and not self.starting[pool_id].done():
            return  # a start (model load) is in progress
        state = self._state(pool_id)
        pool = self.config.pool(pool_id)
        try:
            handle = ray.get_actor(actor_name(pool_id), namespace=self.config.namespace)
        except ValueError:
            handle = None
            if pool_id in self.seen:
                self.seen.discard(pool_id)
                state.failed("pool actor disappeared (its process or node died)")
                log.warning("pool %s disappeared; %s", pool_id, state.describe(), extra={
                    "pool_id": pool_id, "human": f"Pool {pool_id} is gone; it will be restarted."})
        if handle is not None:
            self.seen.add(pool_id)
            try:
                snap = await asyncio.wait_for(handle.snapshot.remote(), PING_TIMEOUT_S)
                digest = await asyncio.wait_for(handle.config_digest.remote(), PING_TIMEOUT_S)
            except (ray.exceptions.RayActorError, asyncio.TimeoutError) as exc:
                self.seen.discard(pool_id)
                state.failed(f"pool actor lost: {type(exc).__name__}")
                log.warning("pool %s lost (%s); %s", pool_id, type(exc).__name__, state.describe(),
                            extra={"pool_id": pool_id, "human": f"Pool {pool_id} stopped answering; it will be restarted."})
                self._kill(handle)
                handle = None
            else:
                model = snap.get("model_ref") or pool.model
                self.models[pool_id] = model
                binding = self._binding(pool, model)
                held = snap.get("waiting_for_model") or snap.get("model_retired")
                if digest != config_digest(pool, self.config):
                    log.info("pool %s configuration changed; replacing it", pool_id)
                    await self._stop(handle)
                    handle = None
                elif binding is not None and self._bind_failed(snap, binding):
                    if pool_id not in self.counted:
                        self.counted.add(pool_id)
                        state.failed(snap.get("last_error") or "binding the catalog's model failed")
                    await self._note(handle, state)
                    if not state.may_restart():
                        return
                    log.warning("restarting pool %s: %s", pool_id, state.last_cause, extra={
                        "pool_id": pool_id, "human": f"Pool {pool_id} could not load its new model; restarting it."})
                    await self._stop(handle)
                    handle = None
                elif binding is not None and self._runtime_env_changed(snap, binding):
                    log.info("pool %s: its engine's runtime_env changed (handoff %s); replacing it", pool_id,
                             binding.get("handoff_id"), extra={"pool_id": pool_id, "human": (
                                 f"Pool {pool_id} restarts with the engine handed off to it.")})
                    await self._stop(handle)
                    handle = None
                elif binding is not None and self._binding_changed(snap, binding):
                    self.starting[pool_id] = asyncio.get_running_loop().create_task(
                        self._bind(pool_id, handle, binding))
                    return
                elif snap["ready"]:
                    state.came_up()
                    state.observe_healthy()
                    return
                elif held:  # waiting for its model, or its model retired: not a failure
                    await self._prepare(handle, snap, binding, model)
                    return
                elif snap.get("engine_failed") or (snap.get("last_error") and not snap.get("loading")):
                    if pool_id not in self.counted:
                        self.counted.add(pool_id)
                        state.failed(snap.get("last_error") or "engine failed")
                    await self._note(handle, state)
                    if not state.may_restart():
                        return  # the failed actor stays, Unready with its cause, until the restart
                    log.warning("restarting pool %s: %s", pool_id, state.last_cause, extra={
                        "pool_id": pool_id, "human": f"Pool {pool_id} failed ({state.last_cause}); restarting it."})
                    await self._stop(handle)
                    handle = None
                else:
                    return  # still loading
        if handle is None:
            if not state.may_restart():
                return
            if state.failures:
                state.restarting()
            self.models[pool_id] = pool.model  # a new actor starts on the configured model
            binding = self._binding(pool)
            try:
                handle = create_pool_actor(pool, self.config, runtime_env=(binding or {}).get("runtime_env"))
            except ValueError:  # the old actor's name is not released yet
                return
            self.seen.add(pool_id)
            self.counted.discard(pool_id)
            if state.failures:  # while the replacement loads, its snapshot says why it restarted
                await self._note(handle, state)
            self.starting[pool_id] = asyncio.get_running_loop().create_task(self._start(pool_id, handle, binding))

    async def _bind(self, pool_id: str, handle, binding: dict[str, Any]) -> None:
        """Hand a live pool its new binding (it loads, swaps or holds in place)."""
        state = self._state(pool_id)
        snap = await self._loaded(pool_id, handle, handle.bind.remote(binding), "binding its model")
        if snap is None:
            return
        if snap["ready"]:
            state.came_up()
            log.info("pool %s bound (%s) and ready", pool_id, binding.get("model_id") or binding.get("handoff_id"),
                     extra={"pool_id": pool_id, "human": f"Pool {pool_id} is ready on the catalog's model."})
        elif snap.get("waiting_for_model") or snap.get("model_retired"):
            log.info("pool %s holds: %s", pool_id, binding.get("note"), extra={"pool_id": pool_id})

    async def _start(self, pool_id: str, handle, binding: Optional[dict[str, Any]] = None) -> None:
        state = self._state(pool_id)
        snap = await self._loaded(pool_id, handle, handle.start.remote(binding), "starting")
        if snap is None:
            return
        if snap["ready"]:
            state.came_up()
            log.info("pool %s ready", pool_id, extra={"pool_id": pool_id, "human": f"Pool {pool_id} is ready."})
        elif snap.get("waiting_for_model") or snap.get("model_retired"):
            log.info("pool %s waits: %s", pool_id, snap.get("last_error"), extra={
                "pool_id": pool_id, "human": f"Pool {pool_id} is up and waits for its model."})
        else:
            self.counted.add(pool_id)
            state.failed(snap.get("last_error") or "did not become ready")
            await self._note(handle, state)

    async def _loaded(self, pool_id: str, handle, call, doing: str) -> Optional[dict[str, Any]]:
        """The snapshot a start or bind call answers; None when it failed (counted; a dead or
        wedged actor is killed, and either way a later round restarts the pool)."""
        state = self._state(pool_id)
        try:
            return await asyncio.wait_for(call, START_TIMEOUT_S)
        except (ray.exceptions.RayActorError, asyncio.TimeoutError) as exc:
            state.failed(f"pool died while {doing}: {type(exc).__name__}: {exc}"[:500])
            self._kill(handle)
        except Exception as exc:  # the call itself failed
            self.counted.add(pool_id)
            state.failed(f"pool failed while {doing}: {type(exc).__name__}: {str(exc)[:300]}")
            await self._note(handle, state)
        return None

    async def _note(self, handle, state: RestartState) -> None:
        try:
            await handle.set_supervision_note.remote(state.describe())
        except ray.exceptions.RayActorError:
            pass

    async def _stop(self, handle) -> None:
        try:
            await asyncio.wait_for(handle.shutdown.remote(), 10)
        except Exception:  # a wedged pool is killed regardless
            pass
        self._kill(handle)
        await self._wait_gone(handle)

    @staticmethod
    def _kill(handle) -> None:
        try:
            ray.kill(handle, no_restart=True)
        except Exception:
            pass

    async def _wait_gone(self, handle, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                await handle.config_digest.remote()
            except ray.exceptions.RayActorError:
                return
            await asyncio.sleep(0.05)

    def status(self) -> dict[str, Any]:
        return {
            pool_id: {
                "restarts": state.restarts,
                "consecutive_failures": state.consecutive,
                "circuit_open": state.circuit_open,
                "last_cause": state.last_cause,
                "note": state.describe(),
                "binding": {key: (self.bindings.get(pool_id) or {}).get(key)
                            for key in ("status", "model_id", "handoff_id", "note")},
            }
            for pool_id, state in self.states.items()
        }

    async def stop_all(self) -> list[str]:
        """Stop supervising and remove every pool (used when the orchestrator is torn down)."""
        from orch.pools.actor import actor_name

        if self._loop_task is not None:
            self._loop_task.cancel()
        removed = []
        for pool in self.config.pools:
            try:
                handle = ray.get_actor(actor_name(pool.id), namespace=self.config.namespace)
            except ValueError:
                continue
            await self._stop(handle)
            removed.append(pool.id)
        return removed


def _without_warmup(prep: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """A preparation plan without the pool's own warm-up step (the pool keeps that one)."""
    if prep is None:
        return None
    return dict(prep, steps=[step for step in prep.get("steps", []) if step.get("step") != "pool_warmup"])


def _head_node_resource() -> dict[str, float]:
    try:
        if "node:__internal_head__" in ray.cluster_resources():
            return {"node:__internal_head__": 0.001}
    except Exception:
        pass
    return {}


def ensure_supervisor(config: OrchConfig):
    """Get or create the supervisor, give it this configuration, reconcile once (pools are
    created and their loads begin) and keep it reconciling. Blocking: call off the loop."""
    from orch.config import to_wire

    wire = to_wire(config)
    supervisor = Supervisor.options(
        name=ACTOR_NAME,
        namespace=config.namespace,
        lifetime="detached",
        get_if_exists=True,
        resources=_head_node_resource(),
        max_concurrency=100,
    ).remote(wire)
    ray.get(supervisor.apply.remote(wire))
    ray.get(supervisor.run.remote())
    return supervisor


def stop_supervisor(namespace: str) -> None:
    try:
        supervisor = ray.get_actor(ACTOR_NAME, namespace=namespace)
    except ValueError:
        return
    try:
        ray.get(supervisor.stop_all.remote(), timeout=60)
    except Exception as exc:  # it is killed regardless
        log.warning("supervisor did not stop its pools cleanly: %s", exc)
    ray.kill(supervisor, no_restart=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            ray.get_actor(ACTOR_NAME, namespace=namespace)
        except ValueError:
            return
        time.sleep(0.05)


def supervisor_status(namespace: str) -> dict[str, Any]:
    try:
        supervisor = ray.get_actor(ACTOR_NAME, namespace=namespace)
    except ValueError:
        return {}
    return ray.get(supervisor.status.remote(), timeout=10)
