"""Each ingress replica's copy of the active keys, and the loop that keeps it current.

Resolving a bearer is a dict lookup by the key's public id and one salted sha256, with no
call to the keys actor on the request path. The loop asks the store's revision every
``POLL_S`` and reloads the keys when it moved, so a revocation or rotation reaches every
replica within about ``POLL_S`` plus one call.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Optional

from orch.api.keys import Principal, principal_from
from orch.tenants import keyhash

log = logging.getLogger("orch.tenants")

#: Seconds between revision checks (a revocation must reach every replica within 1 s).
POLL_S = 0.25
#: Fewest seconds between two store checks caused by keys the cache did not know.
RECHECK_S = 0.05


class KeyCache:
    def __init__(self, backend: Any, tenant_weight: Callable[[str], float] = lambda tenant: 1.0) -> None:
        #: The keys backend (orch/tenants/store.py ``LocalKeys`` or the actor's client).
        self.backend = backend
        self.tenant_weight = tenant_weight
        self.revision: Optional[int] = None
        self._keys: dict[str, tuple[bytes, bytes, Principal]] = {}
        self._task: Optional[asyncio.Task] = None
        self._recheck: Optional[asyncio.Task] = None
        self._recheck_at = 0.0

    def resolve(self, presented: str) -> Optional[Principal]:
        """The principal of a presented key, or None (not a key, unknown, revoked, wrong secret)."""
        parsed = keyhash.parse(presented)
        if parsed is None:
            return None
        key_id, secret = parsed
        entry = self._keys.get(key_id)
        if entry is None:
            # Hash anyway, so an unknown id costs what a wrong secret costs.
            keyhash.matches(b"\0" * keyhash.SALT_BYTES, b"\0" * 32, secret)
            return None
        salt, stored, principal = entry
        return principal if keyhash.matches(salt, stored, secret) else None

    async def resolve_fresh(self, presented: str) -> Optional[Principal]:
        """``resolve``, and when that fails for a well-formed key, once more after asking the
        store whether it changed: a key created or rotated on another replica a moment ago
        works at once rather than after the next poll. Concurrent misses share one check,
        and checks are at least ``RECHECK_S`` apart, so unknown keys cannot flood the store."""
        principal = self.resolve(presented)
        if principal is not None or keyhash.parse(presented) is None:
            return principal
        loop = asyncio.get_running_loop()
        if self._recheck is None or (self._recheck.done() and loop.time() - self._recheck_at >= RECHECK_S):
            self._recheck_at = loop.time()
            self._recheck = loop.create_task(self.refresh(create=True))
        try:
            await asyncio.shield(self._recheck)
        except Exception as exc:  # the store is unreachable: the keys as last loaded decide
            log.debug("key recheck failed: %s", exc)
        return self.resolve(presented)

    def load(self, revision: int, rows: list[dict[str, Any]]) -> None:
        keys = {}
        for row in rows:
            principal = principal_from(row, self.tenant_weight(row["tenant"]))
            keys[row["key_id"]] = (bytes(row["salt"]), bytes(row["hash"]), principal)
        self._keys = keys
        self.revision = revision

    async def refresh(self, create: bool = False) -> bool:
        """Reload when the store's revision moved; says whether it did. ``create``: start the
        store's actor if it is not running (a key was presented that this cache does not
        know); otherwise a store nobody has started yet has no keys."""
        revision = await self.backend.revision(create)
        if revision is None or revision == self.revision:
            return False
        self.load(*await self.backend.active())
        return True

    def start(self) -> None:
        """Keep the cache current from the running loop, until ``stop``."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._follow())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _follow(self) -> None:
        failing = False
        while True:
            try:
                await self.refresh()
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep serving the last keys; say so once per outage
                if not failing:
                    log.warning("key store unreachable, serving the keys as of revision %s: %s", self.revision, exc)
                failing = True
            await asyncio.sleep(POLL_S)
