"""The pool supervisor's eyes on the catalog (a Ray shell, used inside the supervisor actor).

Each reconcile round it: scans the handoff directory and stores new or changed handoff
files in the catalog (orch/catalog/handoff_files.py); asks the catalog actor for its
``generation`` (one cheap call) and reads the records, handoffs and provisioning progress
of the pools' model refs again only when that changed or a fetch is running; and, on
request, starts the fetch of a model a pool waits for when tasks are queued for it and the
outbound policy allows it. From that view it computes each pool's binding and preparation
plan (orch/catalog/binding.py). A catalog that cannot be reached leaves the last view in
place; nothing here ever blocks a round for long.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any, Iterable, Optional

import ray

from orch.actors import ActorClient
from orch.api.pools import CatalogBinding
from orch.catalog import binding as bindings
from orch.catalog.actor import catalog_actor
from orch.catalog.handoff_files import HandoffFileError, list_files, read_file
from orch.config import OrchConfig, project_root
from orch.core.model_ref import ModelRefError, default_model_id
from orch.provision.errors import ProvisionError
from orch.provision.models import ProvisionSettings, plan
from orch.provision.tasks import start_provision

log = logging.getLogger("orch.supervisor")

#: Longest one catalog call may take before the round goes on without it.
CALL_TIMEOUT_S = 5.0
#: After a fetch failed, tasks are refused (with the failure in their preparation) this long
#: before a new task may start another attempt.
FETCH_RETRY_S = 30.0
#: A fetch just asked for is not asked for again within this long (its claim is in flight).
FETCH_START_GRACE_S = 5.0
#: At most one warning per this many seconds when the catalog cannot be reached.
WARN_EVERY_S = 30.0


class CatalogWatcher:
    def __init__(self, config: OrchConfig) -> None:
        #: No retry within a round: a lost catalog is looked up again by the next round's first call.
        self._client = ActorClient(lambda: catalog_actor(self.config.catalog.root, self.config.namespace),
                                    retry=False, timeout=CALL_TIMEOUT_S)
        self.generation: Optional[str] = None
        self.records: list[dict[str, Any]] = []
        self.handoffs: list[dict[str, Any]] = []
        self.progress: dict[str, dict[str, Any]] = {}
        #: The refs the current view was read for; a binding for any other ref is unknown.
        self.viewed: Optional[set[str]] = None
        self._file_stamps: dict[str, tuple[int, int]] = {}
        self._file_ids: dict[str, str] = {}
        self._files_synced = False
        self._fetch_asked: dict[str, float] = {}
        self._fetches: dict[str, Any] = {}
        self._warned_at = 0.0
        self.configure(config)

    def configure(self, config: OrchConfig) -> None:
        self.config = config
        self.base_dir = project_root()
        self.settings = ProvisionSettings.from_config(config.catalog, base_dir=self.base_dir)
        self._policy_cache: dict[str, tuple[bool, Optional[str]]] = {}

    # ------------------------------------------------------------------ the view

    async def _call(self, method: str, *args: Any) -> Any:
        return await self._client.call(method, *args)

    async def refresh(self, models: Iterable[str]) -> None:
        """One round: handoff files, then the view when the catalog changed."""
        keys = {key for key in (bindings.catalog_key(m, self.base_dir) for m in models) if key is not None}
        try:
            await self._scan_handoff_files()
            generation = await self._call("generation")
            fetching = any(entry.get("phase") == "running" for entry in self.progress.values())
            if generation != self.generation or keys != self.viewed or fetching:
                view = await self._call("view", sorted(keys))
                self.records, self.handoffs, self.progress = view["records"], view["handoffs"], view["progress"]
                self.generation, self.viewed = view["generation"], keys
        except (ray.exceptions.RayActorError, asyncio.TimeoutError) as exc:
            self._client.forget()
            self._warn(f"the model catalog is not reachable ({type(exc).__name__}); pools keep their last binding")
        except Exception as exc:  # a broken catalog directory must not stop pool supervision
            self._client.forget()
            self._warn(f"reading the model catalog failed: {type(exc).__name__}: {str(exc)[:300]}")
        self._reap_fetches()

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning("%s", message)

    def binding(self, pool_id: str, engine: str, model: str, attached_url: Optional[str] = None) -> Optional[CatalogBinding]:
        """The pool's binding with its preparation plan; None while the catalog's answer for
        this ref is not known yet (the pool keeps what it has)."""
        key = bindings.catalog_key(model, self.base_dir)
        if self.viewed is None or (key is not None and key not in self.viewed):
            return None
        found = bindings.resolve(pool_id, engine, model, self.records, self.handoffs, self.base_dir,
                                 attached_url=attached_url)
        if found.held:
            allowed, reason = self.fetch_policy(model)
            found = found.but(preparation=bindings.preparation(found, engine, fetch_allowed=allowed,
                                                               blocked_reason=reason,
                                                               progress=self.progress.get(found.model_ref)))
        return found

    def fetch_policy(self, model: str) -> tuple[bool, Optional[str]]:
        """Whether the orchestrator may fetch ``model`` itself, and why not."""
        if model in self._policy_cache:
            return self._policy_cache[model]
        if not self.config.catalog.fetch_on_demand:
            answer: tuple[bool, Optional[str]] = (
                False, "catalog.fetch_on_demand is off: models are provisioned by an operator only")
        else:
            try:
                plan(model, self.settings)
                answer = (True, None)
            except (ModelRefError, ProvisionError) as exc:
                answer = (False, str(exc))
        self._policy_cache[model] = answer
        return answer

    # ------------------------------------------------------------------ fetch on demand

    async def fetch_for(self, binding: CatalogBinding, model: str, node_id: Optional[str]) -> None:
        """Start provisioning the model a waiting pool has tasks for (once; not while one runs,
        nor within FETCH_RETRY_S of a failed one)."""
        key = binding.model_ref
        allowed, _ = self.fetch_policy(model)
        if not allowed or key in self._fetches:
            return
        now = time.monotonic()
        if now - self._fetch_asked.get(key, -1e9) < FETCH_START_GRACE_S:
            return
        progress = self.progress.get(key)
        if progress is not None and progress.get("phase") == "running":
            return
        if progress is not None and progress.get("phase") == "failed" and \
                time.time() - float(progress.get("updated_at") or 0) < FETCH_RETRY_S:
            return
        self._fetch_asked[key] = now
        try:
            steps = plan(model, self.settings)
            claim = await self._call("begin", steps.model_id, steps.ref, None, self.settings.deadline_s + 60)
            if claim["status"] == "conflict":  # the default id names another model: use a distinct one
                model_id = f"{default_model_id(key)[:110]}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
                steps = plan(model, self.settings, model_id=model_id)
                claim = await self._call("begin", steps.model_id, steps.ref, None, self.settings.deadline_s + 60)
            if claim["status"] != "started":
                return  # exists (the next view binds it) or busy (someone else fetches it)
            try:
                self._fetches[key] = start_provision(steps, self.settings, self._client.handle, node_id)
            except Exception as exc:
                await self._call("finish", steps.model_id, f"could not start provisioning: {exc}")
                raise
            log.info("fetching %s for a pool that waits for it", key, extra={
                "human": f"Fetching model {key}: tasks are waiting for it."})
        except Exception as exc:  # the pool's preparation shows the failure through the catalog's progress
            log.warning("could not start fetching %s: %s", key, exc)

    def _reap_fetches(self) -> None:
        """Forget finished fetch tasks (their outcome reaches the pools through the catalog)."""
        if not self._fetches:
            return
        ready, _ = ray.wait(list(self._fetches.values()), num_returns=len(self._fetches), timeout=0)
        done = set(ready)
        for key, ref in list(self._fetches.items()):
            if ref in done:
                del self._fetches[key]

    # ------------------------------------------------------------------ handoff files

    async def _scan_handoff_files(self) -> None:
        folder = self.config.catalog.handoff_dir
        files = await asyncio.to_thread(list_files, folder)
        names = {handoff.name for handoff in files}
        if not self._files_synced:  # files removed while nobody watched take their handoffs along
            for record in await self._call("list_handoffs"):
                origin = str(record.get("origin", ""))
                if origin.startswith("file:") and origin[5:] not in names:
                    await self._call("remove_handoff", record["id"])
                    log.info("handoff %s removed: its file %s is gone", record["id"], origin[5:])
            self._files_synced = True
        for handoff in files:
            if self._file_stamps.get(handoff.name) == handoff.stamp:
                continue
            try:
                record = await asyncio.to_thread(read_file, handoff, self._canonical_ref, self.settings.handoff_roots())
            except HandoffFileError as exc:
                log.warning("ignored: %s", exc, extra={"human": f"Handoff file {handoff.name} is invalid: {exc}"})
                self._file_stamps[handoff.name] = handoff.stamp
                await self._forget_file(handoff.name)
                continue
            previous = self._file_ids.get(handoff.name)
            if previous is not None and previous != record["id"]:
                await self._call("remove_handoff", previous)
            await self._call("put_handoff", record)
            self._file_stamps[handoff.name] = handoff.stamp
            self._file_ids[handoff.name] = record["id"]
            log.info("handoff file %s picked up as handoff %s", handoff.name, record["id"], extra={
                "human": f"Picked up handoff file {handoff.name} ({record['engine']}"
                         + (f" at {record['url']}" if record.get("url") else "") + ")."})
        for name in [name for name in self._file_stamps if name not in names]:
            del self._file_stamps[name]
            await self._forget_file(name)

    async def _forget_file(self, name: str) -> None:
        handoff_id = self._file_ids.pop(name, None)
        if handoff_id is not None:
            await self._call("remove_handoff", handoff_id)
            log.info("handoff %s removed with its file %s", handoff_id, name)

    def _canonical_ref(self, raw: str) -> str:
        key = bindings.catalog_key(raw, self.base_dir)
        if key is None:
            raise ValueError(f"{raw[:200]!r} is not a model ref")
        return key
