"""The limiter: one detached actor that holds every key's windows, slots and budgets.

Every ingress replica reserves through it (one call per admission), so a key's limits hold
across replicas: the actor runs one call at a time on its loop, and a reservation is
checked and taken in one step. The pools settle each task with its real usage when it ends
(orch/pools/actor.py), however it ends; reservations whose end was never reported (a pool
lost with its tasks) are reaped by the ingress (orch/serve/limits.py). Totals and budgets
are saved to a file beside the key store, so a restart keeps them; windows and slots start
empty.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

import ray

from orch.actors import find_actor, singleton, stop_actor
from orch.api.keys import KeyLimits
from orch.core.limits import LimitBook

log = logging.getLogger("orch.tenants")

ACTOR_NAME = "orch-limiter"
#: Seconds between saves of the totals and budgets (only when they changed).
SAVE_EVERY_S = 5.0
#: Reservations older than this are offered to the reaper's check.
REAP_AFTER_S = 60.0


@ray.remote(num_cpus=0, max_restarts=-1)
class LimiterActor:
    def __init__(self, path: Optional[str] = None) -> None:
        self.book = LimitBook()
        self.path = Path(path) if path else None
        self._dirty = False
        self._saver: Optional[asyncio.Task] = None
        #: When each stale reservation was last handed to a reaper (one reaper checks it at a time).
        self._claimed: dict[str, float] = {}
        if self.path is not None and self.path.exists():
            try:
                self.book.load(json.loads(self.path.read_text()))
            except (OSError, ValueError) as exc:
                log.warning("limiter: usage file %s unreadable (%s); starting from zero", self.path, exc)

    def _changed(self) -> None:
        self._dirty = True
        if self.path is not None and (self._saver is None or self._saver.done()):
            self._saver = asyncio.get_running_loop().create_task(self._save_soon())

    async def _save_soon(self) -> None:
        await asyncio.sleep(SAVE_EVERY_S)
        self._dirty = False
        data = json.dumps(self.book.dump())
        try:
            await asyncio.to_thread(_write, self.path, data)
        except OSError as exc:
            log.warning("limiter: could not save usage to %s: %s", self.path, exc)

    async def flush(self) -> None:
        """Save now what is not saved yet (before the actor is stopped)."""
        if self.path is not None and self._dirty:
            self._dirty = False
            await asyncio.to_thread(_write, self.path, json.dumps(self.book.dump()))

    async def reserve(self, key_id: str, tenant: str, limits: dict[str, Any], task_id: str,
                      estimate: int) -> tuple:
        """``Verdict.to_wire()`` of the reservation."""
        verdict = self.book.reserve(key_id, tenant, KeyLimits.model_validate(limits), task_id, estimate, time.time())
        self._changed()
        return verdict.to_wire()

    async def settle(self, task_id: str, tokens_in: int, tokens_out: int) -> bool:
        settled = self.book.settle(task_id, tokens_in, tokens_out, time.time())
        if settled:
            self._claimed.pop(task_id, None)
            self._changed()
        return settled

    async def release(self, task_id: str, refused_by: Optional[str] = None) -> bool:
        released = self.book.release(task_id, time.time(), refused_by)
        if released:
            self._claimed.pop(task_id, None)
            self._changed()
        return released

    async def claim_stale(self, limit: int = 200) -> list[str]:
        """Reservations older than ``REAP_AFTER_S`` no reaper checked in that time either."""
        now = time.time()
        ids = [t for t in self.book.older_than(REAP_AFTER_S, now) if now - self._claimed.get(t, 0.0) > REAP_AFTER_S]
        ids = ids[:limit]
        for task_id in ids:
            self._claimed[task_id] = now
        return ids

    async def reap(self, task_ids: list[str]) -> int:
        reaped = sum(self.book.reap(task_id) for task_id in task_ids)
        for task_id in task_ids:
            self._claimed.pop(task_id, None)
        if reaped:
            log.warning("limiter: freed %d slot(s) of tasks whose end was never reported", reaped)
        return reaped

    async def usage(self, key_id: str, limits: Optional[dict[str, Any]] = None) -> Optional[dict[str, Any]]:
        parsed = KeyLimits.model_validate(limits) if limits is not None else None
        return self.book.usage(key_id, parsed, time.time())

    async def tenant_totals(self) -> dict[str, dict[str, Any]]:
        return self.book.tenant_totals()


def _write(path: Path, data: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    spare = path.with_suffix(".tmp")
    spare.write_text(data)
    os.replace(spare, path)


def limiter_actor(namespace: str, path: Optional[str] = None):
    """The orchestrator's limiter, created on first use (on the head node, beside the keys)."""
    return singleton(LimiterActor, ACTOR_NAME, namespace, path, max_concurrency=1000)


def stop_limiter(namespace: str) -> None:
    """Save its usage and stop it (the next request with a key starts it again)."""
    stop_actor(ACTOR_NAME, namespace, "flush", timeout_s=10)


def find_limiter(namespace: str):
    """The limiter if some ingress created it (pools settle only then), else None."""
    return find_actor(ACTOR_NAME, namespace)
