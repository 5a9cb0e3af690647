"""Ray shell around the key store: one named, detached actor per orchestrator.

Every ingress replica's key cache polls its revision and admin routes write through it,
so the store has a single writer. All state is in the sqlite file, so a restarted actor
(Ray restarts it after a crash) loses nothing. It prefers the head node, whose disk
outlives worker nodes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Optional

import ray

from orch.actors import ActorClient, find_actor, singleton, stop_actor
from orch.tenants.cache import KeyCache
from orch.tenants.store import KeyStore

log = logging.getLogger("orch.tenants")

ACTOR_NAME = "orch-keys"
#: Seconds between two lookups of a keys actor that was not running.
ABSENT_RECHECK_S = 1.0


@ray.remote(num_cpus=0, max_restarts=-1)
class KeysActor:
    def __init__(self, path: str) -> None:
        self.store = KeyStore(path)

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.store.create(body)

    def list(self, tenant: Optional[str] = None) -> list[dict[str, Any]]:
        return self.store.list(tenant)

    def get(self, key_id: str) -> Optional[dict[str, Any]]:
        return self.store.get(key_id)

    def revoke(self, key_id: str) -> Optional[dict[str, Any]]:
        return self.store.revoke(key_id)

    def rotate(self, key_id: str) -> Optional[dict[str, Any]]:
        return self.store.rotate(key_id)

    def revision(self) -> int:
        return self.store.revision()

    def active(self) -> tuple[int, list[dict[str, Any]]]:
        return self.store.active()


def stop_keys_actor(namespace: str) -> None:
    """Stop the keys actor (its state is all in the sqlite file)."""
    stop_actor(ACTOR_NAME, namespace)


def keys_actor(path: str, namespace: str):
    """The orchestrator's keys actor, created on first use."""
    return singleton(KeysActor, ACTOR_NAME, namespace, path)


class ActorKeys:
    """The keys backend over the actor (the same coroutines as ``LocalKeys``)."""

    def __init__(self, path: str, namespace: str) -> None:
        self.path, self.namespace = path, namespace
        self._client = ActorClient(lambda: keys_actor(path, namespace), timeout=10.0)
        self._absent_at: Optional[float] = None

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._client.call("create", body)

    async def list(self, tenant: Optional[str] = None) -> list[dict[str, Any]]:
        return await self._client.call("list", tenant)

    async def get(self, key_id: str) -> Optional[dict[str, Any]]:
        return await self._client.call("get", key_id)

    async def revoke(self, key_id: str) -> Optional[dict[str, Any]]:
        return await self._client.call("revoke", key_id)

    async def rotate(self, key_id: str) -> Optional[dict[str, Any]]:
        return await self._client.call("rotate", key_id)

    async def revision(self, create: bool = False) -> Optional[int]:
        """The store's revision; None while its actor has never been started (no key was ever
        made or presented), so an orchestrator that uses no keys runs no keys actor. Whether
        it exists is looked up at most once a second."""
        if self._client.handle is None and not create:
            now = time.monotonic()
            if self._absent_at is not None and now - self._absent_at < ABSENT_RECHECK_S:
                return None
            if await asyncio.to_thread(find_actor, ACTOR_NAME, self.namespace) is None:
                self._absent_at = now
                return None
            self._absent_at = None
        return await self._client.call("revision", timeout=2.0)

    async def active(self) -> tuple[int, list[dict[str, Any]]]:
        return await self._client.call("active")


async def start_key_cache(config: Any) -> "KeyCache":
    """An ingress replica's key cache over the keys actor, loaded once and then kept current."""
    cache = KeyCache(ActorKeys(config.tenants.key_store, config.namespace), config.tenants.weight)
    try:  # keys made before (the store's file is here): start its actor now
        await cache.refresh(create=os.path.exists(config.tenants.key_store))
    except Exception as exc:  # the loop keeps trying; until then only the bootstrap token works
        log.warning("key store not reachable at start: %s", exc)
    cache.start()
    return cache
