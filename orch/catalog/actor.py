"""Ray shell around the catalog store: one named, detached actor per orchestrator.

Every ingress replica and every provisioning task talks to this one actor, so the catalog has
a single writer. All state that matters is on disk (the records are rewritten atomically and
the index is rebuilt from them when the actor starts), so killing the actor and starting it
again loses nothing; Ray restarts it after a crash. Provisioning progress and the set of
provisionings in flight are kept in memory only: they describe work that dies with it. It
prefers the head node, whose disk outlives worker nodes.

Every change (a record or handoff written, a state changed, a provisioning ended) bumps
``generation``, a string that also changes when the actor restarts, so the pool supervisor
polls one cheap call per round and reads the catalog again only when something changed.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Optional

import ray

from orch.actors import singleton
from orch.catalog.store import CatalogStore

ACTOR_NAME = "orch-catalog"


@ray.remote(num_cpus=0)
class CatalogActor:
    def __init__(self, root: str) -> None:
        self.store = CatalogStore(root)
        self.store.rebuild_index()
        self._progress: dict[str, dict[str, Any]] = {}
        self._in_flight: dict[str, dict[str, Any]] = {}
        self._boot = uuid.uuid4().hex[:12]
        self._changes = 0

    def generation(self) -> str:
        """Changes whenever the catalog changed (and when this actor restarted)."""
        return f"{self._boot}:{self._changes}"

    def _changed(self, result: Any = None) -> Any:
        self._changes += 1
        return result

    # ------------------------------------------------------------------ records

    def put(self, record: dict[str, Any]) -> dict[str, Any]:
        return self._changed(self.store.put(record))

    def get(self, model_id: str) -> Optional[dict[str, Any]]:
        return self.store.get(model_id)

    def list(self, state: Optional[str] = None) -> list[dict[str, Any]]:
        return self.store.list(state)

    def exists(self, model_id: str) -> bool:
        return self.store.exists(model_id)

    def locate(self, ref: str, state: Optional[str] = "Active") -> Optional[dict[str, Any]]:
        return self.store.locate(ref, state)

    def set_state(self, model_id: str, state: str) -> Optional[dict[str, Any]]:
        return self._changed(self.store.set_state(model_id, state))

    def record_verification(self, model_id: str, ok: bool, digest: Optional[str]) -> Optional[dict[str, Any]]:
        return self._changed(self.store.update(model_id, last_verification={"at": time.time(), "ok": ok,
                                                                            "digest": digest}))

    def remove(self, model_id: str) -> Optional[dict[str, Any]]:
        """Delete a record; says whether another record still uses the same files."""
        record = self.store.delete(model_id)
        if record is None:
            return None
        shared = bool(self.store.find(local_path=record["local_path"]))
        self._progress.pop(model_id, None)
        return self._changed({"record": record, "shared": shared})

    # ------------------------------------------------------------------ handoffs

    def put_handoff(self, record: dict[str, Any]) -> dict[str, Any]:
        return self._changed(self.store.put_handoff(record))

    def get_handoff(self, handoff_id: str) -> Optional[dict[str, Any]]:
        return self.store.get_handoff(handoff_id)

    def list_handoffs(self) -> list[dict[str, Any]]:
        return self.store.list_handoffs()

    def remove_handoff(self, handoff_id: str) -> Optional[dict[str, Any]]:
        return self._changed(self.store.delete_handoff(handoff_id))

    def view(self, refs: list[str]) -> dict[str, Any]:
        """What the supervisor binds pools from, in one call: the records for ``refs`` (every
        state), every handoff, and the provisioning progress of those refs."""
        wanted = set(refs)
        records = [record for ref in sorted(wanted) for record in self.store.find(ref=ref)]
        progress = {}
        for model_id, entry in self._progress.items():
            if entry.get("ref") in wanted:
                current = progress.get(entry["ref"])
                if current is None or entry.get("updated_at", 0) >= current.get("updated_at", 0):
                    progress[entry["ref"]] = dict(entry, model_id=model_id)
        return {"generation": self.generation(), "records": records, "handoffs": self.store.list_handoffs(),
                "progress": progress}

    def rebuild_index(self) -> int:
        return self.store.rebuild_index()

    # ------------------------------------------------------------------ provisioning

    def begin(self, model_id: str, ref: str, digest: Optional[str] = None, ttl_s: float = 3600.0) -> dict[str, Any]:
        """Claim ``model_id`` for a provisioning of ``ref``. Answers ``started``, ``exists``
        (the same ref is already catalogued), ``conflict`` (the id names something else) or
        ``busy`` (a provisioning of this id is running)."""
        existing = self.store.get(model_id)
        if existing is not None:
            if existing["ref"] != ref or (digest is not None and existing["digest"] != digest):
                return {"status": "conflict", "record": existing}
            return {"status": "exists", "record": existing}
        now = time.time()
        running = self._in_flight.get(model_id)
        if running is not None and running["until"] > now:
            return {"status": "busy", "ref": running["ref"], "progress": self._progress.get(model_id)}
        self._in_flight[model_id] = {"ref": ref, "until": now + ttl_s}
        self._progress[model_id] = {"done": 0, "total": None, "phase": "running", "error": None, "updated_at": now,
                                    "ref": ref}
        return self._changed({"status": "started"})

    def finish(self, model_id: str, error: Optional[str] = None) -> None:
        running = self._in_flight.pop(model_id, None)
        entry = self._progress.setdefault(model_id, {"done": 0, "total": None})
        if running is not None:
            entry.setdefault("ref", running["ref"])
        entry.update(phase="failed" if error else "done", error=error, updated_at=time.time())
        self._changed()

    def progress(self, model_id: str, done: int, total: Optional[int]) -> None:
        entry = self._progress.setdefault(model_id, {"phase": "running", "error": None})
        entry.update(done=int(done), total=None if total is None else int(total), updated_at=time.time())

    def progress_of(self, model_id: str) -> Optional[dict[str, Any]]:
        entry = self._progress.get(model_id)
        return dict(entry) if entry is not None else None


def catalog_actor(root: str, namespace: str):
    """The orchestrator's catalog actor, created on first use."""
    return singleton(CatalogActor, ACTOR_NAME, namespace, root, max_restarts=-1)
