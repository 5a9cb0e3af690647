"""The ingress's side of models on demand: which model-set pools exist now, and the one
call a request naming a cold model makes before placement.

A request for a model that a Ready pool serves costs nothing here beyond a look at the
cached views (and, at most once a second per model, a "used" note to the manager, sent
without waiting). Only a cold model costs a call: the manager (orch/pools/demand.py) loads
it once however many requests ask. v2 tasks then queue in the preparing pool; OpenAI
requests wait up to ``max_load_wait_s`` for it to be Ready, then get a 503 POOL_UNREADY.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Iterable, Optional

from orch.actors import ActorClient, find_actor
from orch.api.errors import ErrorCode
from orch.api.pools import PoolView
from orch.config import OrchConfig, PoolConfig
from orch.config.model_set import ModelEntry
from orch.core.errors import OrchError
from orch.pools.demand import ACTOR_NAME, LOAD_TIMEOUT_S, pool_config

log = logging.getLogger("orch.ingress")

#: Seconds the manager's state is trusted before it is asked again.
STATE_TTL_S = 1.0
#: At most one "used" note per model per this many seconds.
TOUCH_EVERY_S = 1.0


class DemandClient:
    def __init__(self, config: OrchConfig) -> None:
        assert config.model_set is not None
        self.config = config
        self.models = config.model_set
        self._client = ActorClient(lambda: find_actor(ACTOR_NAME, config.namespace), timeout=LOAD_TIMEOUT_S)
        self._state: dict[str, Any] = {"models": [], "budgets": [], "metrics": {}}
        self._state_at = 0.0
        #: Model pools that exist now (loaded or loading), as the manager last said.
        self.live: set[str] = set()
        self._touched: dict[str, float] = {}
        self._pools = {m.id: pool_config(m) for m in self.models.models}

    def pool_ids(self) -> list[str]:
        return sorted(self.live)

    def pool_config(self, pool_id: str) -> Optional[PoolConfig]:
        return self._pools.get(pool_id)

    def entry(self, name: Optional[str]) -> Optional[ModelEntry]:
        """The model a request's name means: a model id, else the first model with that ref."""
        if not name:
            return None
        for model in self.models.models:
            if model.id == name:
                return model
        return next((m for m in self.models.models if m.ref == name), None)

    async def state(self, max_age_s: float = STATE_TTL_S) -> dict[str, Any]:
        """The manager's state (every model and budget), at most ``max_age_s`` old."""
        if time.monotonic() - self._state_at > max_age_s:
            try:
                self._take(await self._client.call("report", timeout=5.0))
            except Exception as exc:  # the manager is restarting: the last state stands
                log.debug("model manager state unavailable: %s", exc)
        return self._state

    def _take(self, state: dict[str, Any]) -> None:
        self._state, self._state_at = state, time.monotonic()
        self.live = {m["pool_id"] for m in state["models"] if m["state"] != "unloaded"}

    async def call(self, method: str, *args: Any) -> dict[str, Any]:
        """A manager call; its OrchError reaches the caller as itself."""
        try:
            answer = await self._client.call(method, *args)
        except Exception as exc:
            cause = getattr(exc, "cause", exc)
            if isinstance(cause, OrchError):
                raise OrchError(cause.code, cause.message, retriable=cause.retriable,
                                retry_after_ms=cause.retry_after_ms, pool_id=cause.pool_id) from None
            raise OrchError(ErrorCode.POOL_UNAVAILABLE, f"the model manager is not reachable: {type(exc).__name__}",
                            retriable=True, retry_after_ms=1000) from None
        self._state_at = 0.0  # the next read asks again
        if answer.get("state") != "unloaded":
            self.live.add(answer["pool_id"])
        else:
            self.live.discard(answer["pool_id"])
        return answer

    async def ensure(self, name: Optional[str], views: Iterable[PoolView], wait: bool) -> bool:
        """Make sure the model ``name`` means is loaded or loading; True when a call was
        made (the caller's views are out of date). ``wait``: until Ready, or a 503."""
        entry = self.entry(name)
        if entry is None:
            return False
        await self.state()  # a model pool the cached views still show may have been unloaded since
        views = [v for v in views if v.pool_id not in self._pools or v.pool_id in self.live]
        if any(v.accepting and v.serves(None, name) for v in views):
            self._touch(entry.id, views)
            return False
        if not wait and any((v.held or v.queues_while_loading) and v.serves(None, entry.id) for v in views):
            return False  # it is loading: the task queues in its pool
        answer = await self.call("ensure", entry.id)
        if wait and answer["state"] != "loaded":
            wait_s = entry.max_load_wait_s or self.models.max_load_wait_s
            answer = await self.call("wait", entry.id, wait_s)
            if answer["state"] == "unloaded":
                raise OrchError(ErrorCode.POOL_UNAVAILABLE, f"model '{entry.id}' failed to load: "
                                f"{answer.get('last_error') or 'unknown cause'}", retriable=True,
                                retry_after_ms=1000, pool_id=entry.id)
            if answer["state"] != "loaded":
                raise OrchError(ErrorCode.POOL_UNREADY, f"model '{entry.id}' is still loading after {wait_s:g} s; "
                                "retry shortly", retriable=True, retry_after_ms=5000, pool_id=entry.id)
        return True

    def _touch(self, model_id: str, views: list[PoolView]) -> None:
        """Note a use of a loaded model of the set (keep_alive counts from it), without waiting."""
        if model_id not in self.live and not any(v.pool_id == model_id for v in views):
            return  # served by a configured pool: nothing of the set was used
        now = time.monotonic()
        if now - self._touched.get(model_id, 0.0) < TOUCH_EVERY_S:
            return
        self._touched[model_id] = now
        asyncio.ensure_future(self._quiet("touch", model_id))

    async def _quiet(self, method: str, *args: Any) -> None:
        try:
            await self._client.call(method, *args)
        except Exception:  # a lost note only shortens keep_alive by a second
            pass
