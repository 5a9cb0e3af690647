"""The API keys' sqlite store. Plain Python, no Ray: the keys actor owns one instance.

Only salted hashes are stored (orch/tenants/keyhash.py); every statement is parameterized,
so names and metadata are stored verbatim whatever they hold. A ``revision`` counter in the
file changes with every write; ingress replicas poll it and reload their key cache when it
moves, which is how a revocation reaches every replica within a second.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Optional

from orch.tenants import keyhash

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    salt BLOB NOT NULL,
    hash BLOB NOT NULL,
    scopes TEXT NOT NULL,
    models TEXT,
    priority_ceiling TEXT NOT NULL,
    limits TEXT NOT NULL,
    weight REAL,
    metadata TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL,
    rotated_at REAL
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0);
"""

_INFO_COLUMNS = ("key_id, tenant, name, scopes, models, priority_ceiling, limits, weight, metadata, created_at, "
                 "revoked_at, rotated_at")


class KeyStore:
    def __init__(self, path: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    def revision(self) -> int:
        return int(self.db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0])

    def _bump(self) -> None:
        self.db.execute("UPDATE meta SET value = value + 1 WHERE name = 'revision'")

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        """Store a key made from a ``KeyCreate`` dump; returns its info with ``key``, the
        secret, which is not kept."""
        for _ in range(5):
            key_id, secret, whole = keyhash.mint()
            if self.get(key_id) is None:
                break
        else:  # pragma: no cover - 48 random bits colliding five times
            raise RuntimeError("could not find a free key id")
        salt = keyhash.new_salt()
        models = body.get("models")
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute(
                "INSERT INTO keys (key_id, tenant, name, salt, hash, scopes, models, priority_ceiling, limits, weight, "
                "metadata, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key_id, body["tenant"], body.get("name", ""), salt, keyhash.digest(salt, secret),
                 json.dumps(list(body.get("scopes", ["infer"]))), None if models is None else json.dumps(models),
                 body.get("priority_ceiling", "interactive"), json.dumps(body.get("limits") or {}), body.get("weight"),
                 json.dumps(body.get("metadata") or {}), time.time()))
            self._bump()
        return dict(self.get(key_id), key=whole)

    def get(self, key_id: str) -> Optional[dict[str, Any]]:
        row = self.db.execute(f"SELECT {_INFO_COLUMNS} FROM keys WHERE key_id = ?", (key_id,)).fetchone()
        return _info(row) if row else None

    def list(self, tenant: Optional[str] = None) -> list[dict[str, Any]]:
        if tenant is None:
            rows = self.db.execute(f"SELECT {_INFO_COLUMNS} FROM keys ORDER BY created_at, key_id").fetchall()
        else:
            rows = self.db.execute(f"SELECT {_INFO_COLUMNS} FROM keys WHERE tenant = ? ORDER BY created_at, key_id",
                                   (tenant,)).fetchall()
        return [_info(row) for row in rows]

    def revoke(self, key_id: str) -> Optional[dict[str, Any]]:
        """Revoke a key (a second revoke keeps the first time); None for an unknown id."""
        with self.db:
            self.db.execute("BEGIN")
            changed = self.db.execute("UPDATE keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                                      (time.time(), key_id)).rowcount
            if changed:
                self._bump()
        return self.get(key_id)

    def rotate(self, key_id: str) -> Optional[dict[str, Any]]:
        """A new secret for the same key id (its limits and usage carry on); the old secret
        stops working. None for an unknown or revoked key."""
        _, secret, whole = keyhash.mint(key_id)
        salt = keyhash.new_salt()
        with self.db:
            self.db.execute("BEGIN")
            changed = self.db.execute(
                "UPDATE keys SET salt = ?, hash = ?, rotated_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (salt, keyhash.digest(salt, secret), time.time(), key_id)).rowcount
            if not changed:
                return None
            self._bump()
        return dict(self.get(key_id), key=whole)

    def active(self) -> tuple[int, list[dict[str, Any]]]:
        """(revision, every unrevoked key's info with its ``salt`` and ``hash``): what a key
        cache verifies presented keys against."""
        with self.db:
            self.db.execute("BEGIN")
            revision = self.revision()
            rows = self.db.execute(f"SELECT {_INFO_COLUMNS}, salt, hash FROM keys WHERE revoked_at IS NULL").fetchall()
        return revision, [dict(_info(row[:12]), salt=bytes(row[12]), hash=bytes(row[13])) for row in rows]

    def close(self) -> None:
        self.db.close()


def _info(row: tuple) -> dict[str, Any]:
    (key_id, tenant, name, scopes, models, ceiling, limits, weight, metadata, created_at, revoked_at,
     rotated_at) = row
    return {
        "key_id": key_id, "tenant": tenant, "name": name, "scopes": json.loads(scopes),
        "models": None if models is None else json.loads(models), "priority_ceiling": ceiling,
        "limits": json.loads(limits), "weight": weight, "metadata": json.loads(metadata), "created_at": created_at,
        "revoked_at": revoked_at, "rotated_at": rotated_at,
    }


class LocalKeys:
    """The keys backend over a store in this process (tests, tools); the actor-backed one
    (orch/tenants/actor.py) has the same coroutines."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.store.create(body)

    async def list(self, tenant: Optional[str] = None) -> list[dict[str, Any]]:
        return self.store.list(tenant)

    async def get(self, key_id: str) -> Optional[dict[str, Any]]:
        return self.store.get(key_id)

    async def revoke(self, key_id: str) -> Optional[dict[str, Any]]:
        return self.store.revoke(key_id)

    async def rotate(self, key_id: str) -> Optional[dict[str, Any]]:
        return self.store.rotate(key_id)

    async def revision(self, create: bool = False) -> int:
        return self.store.revision()

    async def active(self) -> tuple[int, list[dict[str, Any]]]:
        return self.store.active()
