"""The pool supervisor: one named actor per orchestrator that keeps the configured pools
running.

It reconciles the configured pools (replica sets already expanded by the config) with the
pool actors that exist: creates the missing ones, watches each (a snapshot call with a
timeout), and restarts a dead pool, or one whose engine failed to load or failed at run
time, after an exponential backoff. A circuit breaker (orch/core/supervision.py) stops a
restart storm: the pool stays Unready and says why. Ray decides where a pool lands from
its resources (``num_gpus``, ``num_cpus``, custom ``resources``), so a pool whose node dies
comes back on another node that has the capacity. Each round observes every pool; what to
do with it is ``next_action``'s decision (orch/core/supervision.py), and this actor acts.

It also binds pools to the catalog (orch/pools/catalog_watcher.py, orch/catalog/binding.py):
a pool whose model is not present yet holds ("waiting for model"), which is not a failure
and never counts against the restart policy; when the catalog gets the model (provisioned,
or handed off) the pool is bound in place, without a restart, and becomes Ready; a retired
model makes the pools serving it hold; a handed-off engine whose runtime_env differs
replaces the actor. Tasks queued in a waiting pool trigger the model's fetch when the policy
allows it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Optional

import ray

from orch.actors import find_actor, singleton, stop_actor
from orch.api.pools import CatalogBinding, PoolSnapshot, PoolView
from orch.catalog import binding as bindings
from orch.config import OrchConfig, PoolConfig, check_gpu_capacity, parse_config, to_wire
from orch.core.supervision import Action, PoolObservation, Reason, RestartPolicy, RestartState, Step, next_action
from orch.observability.logs import configure_logging
from orch.pools.actor import actor_name, config_digest, pool_handle
from orch.pools.catalog_watcher import CatalogWatcher
from orch.pools.demand import ensure_models, stop_models
from orch.pools.spawn import create_pool_actor, remove_pool_actors
from orch.tenants.actor import stop_keys_actor
from orch.tenants.limiter import stop_limiter

log = logging.getLogger("orch.supervisor")

ACTOR_NAME = "orch-supervisor"
#: Seconds between two reconcile rounds.
RECONCILE_EVERY_S = 0.5
#: A pool that does not answer a snapshot within this long is treated as dead.
PING_TIMEOUT_S = 10.0
#: How long one start (model load) may take before the pool counts as failed.
START_TIMEOUT_S = 900.0


class _Seen:
    """One pool as a round found it: the decision's input, and what acting on it needs."""

    def __init__(self, observation: PoolObservation, handle: Any = None, snap: Optional[PoolSnapshot] = None,
                 binding: Optional[CatalogBinding] = None) -> None:
        self.observation, self.handle, self.snap, self.binding = observation, handle, snap, binding


@ray.remote(num_cpus=0, max_restarts=-1)
class Supervisor:
    def __init__(self, config: dict[str, Any]) -> None:
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
        self.bindings: dict[str, CatalogBinding] = {}

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

    def _binding(self, pool: PoolConfig, model: Optional[str] = None) -> Optional[CatalogBinding]:
        """What the catalog says ``pool`` loads (None: not known this round)."""
        found = self.catalog.binding(pool.id, pool.engine.value, model or pool.model,
                                     attached_url=pool.engine_options.get("base_url"))
        if found is not None:
            self.bindings[pool.id] = found
        return found

    def _state(self, pool_id: str) -> RestartState:
        if pool_id not in self.states:
            self.states[pool_id] = RestartState(policy=self.policy)
        return self.states[pool_id]

    # -- one pool, one round: observe, decide (next_action), act -------------------------
    async def _reconcile_pool(self, pool_id: str) -> None:
        seen = await self._observe(pool_id)
        await self._act(pool_id, next_action(seen.observation), seen)

    async def _observe(self, pool_id: str) -> _Seen:
        if pool_id in self.starting and not self.starting[pool_id].done():
            return _Seen(PoolObservation(starting=True))
        pool = self.config.pool(pool_id)
        handle = find_actor(actor_name(pool_id), self.config.namespace)
        if handle is None:
            return _Seen(PoolObservation(found=False, seen=pool_id in self.seen))
        self.seen.add(pool_id)
        try:
            snap: PoolSnapshot = await asyncio.wait_for(handle.report.remote(), PING_TIMEOUT_S)
            digest = await asyncio.wait_for(handle.config_digest.remote(), PING_TIMEOUT_S)
        except (ray.exceptions.RayActorError, asyncio.TimeoutError) as exc:
            return _Seen(PoolObservation(found=True, seen=True, lost=type(exc).__name__), handle)
        view = snap.view
        model = view.model_ref or pool.model
        self.models[pool_id] = model
        binding = self._binding(pool, model)
        observation = PoolObservation(
            found=True, seen=True, config_changed=digest != config_digest(pool, self.config),
            bind_failed=binding is not None and _bind_failed(snap, binding),
            runtime_env_changed=binding is not None and _runtime_env_changed(snap, binding),
            binding_changed=binding is not None and _binding_changed(snap, binding),
            ready=view.ready, held=view.held, loading=view.loading, engine_failed=view.engine_failed,
            last_error=view.last_error, counted=pool_id in self.counted)
        return _Seen(observation, handle, snap, binding)

    async def _act(self, pool_id: str, action: Action, seen: _Seen) -> None:
        state, handle = self._state(pool_id), seen.handle
        if action.step is Step.wait:
            return
        if action.step is Step.healthy:
            state.came_up()
            state.observe_healthy()
        elif action.step is Step.hold:
            await self._prepare(handle, seen.snap, seen.binding, self.models[pool_id])
        elif action.step is Step.bind:
            self.starting[pool_id] = asyncio.get_running_loop().create_task(self._bind(pool_id, handle, seen.binding))
        elif action.step is Step.restart:
            if action.count:
                self.counted.add(pool_id)
                state.failed(action.cause)
            await self._note(handle, state)
            if not state.may_restart():
                return  # the failed actor stays, Unready with its cause, until the restart
            _log_restart(pool_id, action, state)
            await self._stop(handle)
            await self._create(pool_id)
        elif action.step is Step.replace:
            _log_replace(pool_id, action, seen.binding)
            await self._stop(handle)
            await self._create(pool_id)
        else:
            if action.reason is not None:  # the actor vanished, or stopped answering
                self._lost(pool_id, action, state, handle)
            await self._create(pool_id)

    def _lost(self, pool_id: str, action: Action, state: RestartState, handle: Any) -> None:
        self.seen.discard(pool_id)
        state.failed(action.cause)
        if action.reason is Reason.lost:
            log.warning("pool %s lost (%s); %s", pool_id, action.cause.split(": ", 1)[-1], state.describe(),
                        extra={"pool_id": pool_id, "human": f"Pool {pool_id} stopped answering; it will be restarted."})
            self._kill(handle)
        else:
            log.warning("pool %s disappeared; %s", pool_id, state.describe(), extra={
                "pool_id": pool_id, "human": f"Pool {pool_id} is gone; it will be restarted."})

    async def _create(self, pool_id: str) -> None:
        """A new actor for the pool, when the restart policy allows one now; it starts in the background."""
        state = self._state(pool_id)
        if not state.may_restart():
            return
        if state.failures:
            state.restarting()
        pool = self.config.pool(pool_id)
        self.models[pool_id] = pool.model  # a new actor starts on the configured model
        binding = self._binding(pool)
        try:
            handle = create_pool_actor(pool, self.config, runtime_env=binding.runtime_env if binding else None)
        except ValueError:  # the old actor's name is not released yet
            return
        self.seen.add(pool_id)
        self.counted.discard(pool_id)
        if state.failures:  # while the replacement loads, its snapshot says why it restarted
            await self._note(handle, state)
        self.starting[pool_id] = asyncio.get_running_loop().create_task(self._start(pool_id, handle, binding))

    async def _prepare(self, handle, snap: PoolSnapshot, binding: Optional[CatalogBinding], model: str) -> None:
        """A pool that holds: keep its preparation plan current and, when tasks wait for the
        model and the policy allows, have it fetched."""
        if binding is None or not binding.held:
            return
        prep = binding.preparation
        if prep is not None and _without_warmup(prep) != _without_warmup(snap.detail.preparation):
            try:
                await asyncio.wait_for(handle.set_preparation.remote(prep), PING_TIMEOUT_S)
            except (ray.exceptions.RayActorError, asyncio.TimeoutError):
                return
        view = snap.view
        if binding.status == bindings.WAITING and view.queue_depth > 0 and view.engine != "external":
            await self.catalog.fetch_for(binding, model, view.node_id)

    async def _bind(self, pool_id: str, handle, binding: CatalogBinding) -> None:
        """Hand a live pool its new binding (it loads, swaps or holds in place)."""
        state = self._state(pool_id)
        snap = await self._loaded(pool_id, handle, handle.bind.remote(binding), "binding its model")
        if snap is None:
            return
        if snap.ready:
            state.came_up()
            log.info("pool %s bound (%s) and ready", pool_id, binding.model_id or binding.handoff_id,
                     extra={"pool_id": pool_id, "human": f"Pool {pool_id} is ready on the catalog's model."})
        elif snap.held:
            log.info("pool %s holds: %s", pool_id, binding.note, extra={"pool_id": pool_id})

    async def _start(self, pool_id: str, handle, binding: Optional[CatalogBinding] = None) -> None:
        state = self._state(pool_id)
        snap = await self._loaded(pool_id, handle, handle.start.remote(binding), "starting")
        if snap is None:
            return
        if snap.ready:
            state.came_up()
            log.info("pool %s ready", pool_id, extra={"pool_id": pool_id, "human": f"Pool {pool_id} is ready."})
        elif snap.held:
            log.info("pool %s waits: %s", pool_id, snap.last_error, extra={
                "pool_id": pool_id, "human": f"Pool {pool_id} is up and waits for its model."})
        else:
            self.counted.add(pool_id)
            state.failed(snap.last_error or "did not become ready")
            await self._note(handle, state)

    async def _loaded(self, pool_id: str, handle, call, doing: str) -> Optional[PoolView]:
        """The view a start or bind call answers; None when it failed (counted; a dead or
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
                "binding": {key: getattr(self.bindings[pool_id], key) if pool_id in self.bindings else None
                            for key in ("status", "model_id", "handoff_id", "note")},
            }
            for pool_id, state in self.states.items()
        }

    async def stop_all(self) -> list[str]:
        """Stop supervising and remove every pool (used when the orchestrator is torn down)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
        removed = []
        for pool in self.config.pools:
            handle = find_actor(actor_name(pool.id), self.config.namespace)
            if handle is None:
                continue
            await self._stop(handle)
            removed.append(pool.id)
        return removed


# -- what a round observes about a pool's binding --------------------------------------------
def _binding_changed(snap: PoolSnapshot, binding: CatalogBinding) -> bool:
    actual = snap.detail.binding
    if actual is None:  # started without the catalog's word: only a non-local binding is news
        return binding.status != bindings.LOCAL
    return actual.load_key != binding.load_key or actual.status != binding.status


def _bind_failed(snap: PoolSnapshot, binding: CatalogBinding) -> bool:
    actual = snap.detail.binding
    return actual is not None and actual.failed_key == binding.load_key


def _runtime_env_changed(snap: PoolSnapshot, binding: CatalogBinding) -> bool:
    return snap.view.runtime_env_key != binding.runtime_env_key


def _without_warmup(prep: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """A preparation plan without the pool's own warm-up step (the pool keeps that one)."""
    if prep is None:
        return None
    return dict(prep, steps=[step for step in prep.get("steps", []) if step.get("step") != "pool_warmup"])


def _log_restart(pool_id: str, action: Action, state: RestartState) -> None:
    if action.reason is Reason.bind_failed:
        human = f"Pool {pool_id} could not load its new model; restarting it."
    else:
        human = f"Pool {pool_id} failed ({state.last_cause}); restarting it."
    log.warning("restarting pool %s: %s", pool_id, state.last_cause, extra={"pool_id": pool_id, "human": human})


def _log_replace(pool_id: str, action: Action, binding: Optional[CatalogBinding]) -> None:
    if action.reason is Reason.config_changed:
        log.info("pool %s configuration changed; replacing it", pool_id)
        return
    log.info("pool %s: its engine's runtime_env changed (handoff %s); replacing it", pool_id,
             binding.handoff_id if binding else None, extra={"pool_id": pool_id, "human": (
                 f"Pool {pool_id} restarts with the engine handed off to it.")})


# -- the supervisor's own lifecycle, and the orchestrator's pools through it -----------------
def ensure_supervisor(config: OrchConfig):
    """Get or create the supervisor, give it this configuration, reconcile once (pools are
    created and their loads begin) and keep it reconciling. Blocking: call off the loop."""
    wire = to_wire(config)
    supervisor = singleton(Supervisor, ACTOR_NAME, config.namespace, wire, max_concurrency=100)
    ray.get(supervisor.apply.remote(wire))
    ray.get(supervisor.run.remote())
    return supervisor


def stop_supervisor(namespace: str) -> None:
    if not stop_actor(ACTOR_NAME, namespace, "stop_all"):
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if find_actor(ACTOR_NAME, namespace) is None:
            return
        time.sleep(0.05)


def supervisor_status(namespace: str) -> dict[str, Any]:
    supervisor = find_actor(ACTOR_NAME, namespace)
    if supervisor is None:
        return {}
    return ray.get(supervisor.status.remote(), timeout=10)


def ensure_pools(config: OrchConfig) -> dict[str, "ray.actor.ActorHandle"]:
    """Hand the configuration to the supervisor, which creates, starts and watches every
    pool (idempotent: every ingress replica calls it on start). Returns the pool handles
    that exist already; the registry finds the others by name as they appear."""
    check_gpu_capacity(config, ray.cluster_resources().get("GPU", 0))
    ensure_supervisor(config)
    ensure_models(config)
    handles = {}
    for pool in config.pools:
        try:
            handles[pool.id] = pool_handle(pool.id, config.namespace)
        except ValueError:
            continue
    return handles


def shutdown_pools(config: OrchConfig) -> list[str]:
    """Stop the supervisor, the model manager and the tenants' actors (keys and limiter keep
    their state on disk), then stop and remove every configured pool actor (they are
    detached, so deleting the Serve application alone leaves them holding their GPUs)."""
    stop_supervisor(config.namespace)
    stop_models(config.namespace)
    stop_keys_actor(config.namespace)
    stop_limiter(config.namespace)
    return remove_pool_actors(config)
