"""Ray shell around the artifact store: one named, detached actor per orchestrator.

Pools send task transcripts here and every ingress replica reads from here, so an artifact
written on any node is readable through any replica. It prefers the head node, whose disk
outlives worker nodes.
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional

import ray

from orch.artifacts.store import ArtifactStore

ACTOR_NAME = "orch-artifacts"
#: How long a read waits for an artifact that a pool is writing right now (a client that
#: fetches a transcript the moment its stream ends).
PENDING_WAIT_S = 2.0


@ray.remote(num_cpus=0)
class ArtifactActor:
    def __init__(self, root: str) -> None:
        self.store = ArtifactStore(root)
        self.root = root
        self._written = asyncio.Condition()

    async def put(self, body: dict[str, Any]) -> dict[str, Any]:
        art_id, created = await asyncio.to_thread(self.store.put, body)
        async with self._written:
            self._written.notify_all()
        return {"id": art_id, "created": created}

    async def get(self, art_id: str, wait_s: float = 0.0) -> Optional[dict[str, Any]]:
        wait_s = min(max(wait_s, 0.0), PENDING_WAIT_S)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            record = await asyncio.to_thread(self.store.get, art_id)
            remaining = deadline - loop.time()
            if record is not None or remaining <= 0:
                return record
            async with self._written:
                try:
                    await asyncio.wait_for(self._written.wait(), remaining)
                except asyncio.TimeoutError:
                    pass

    async def root_dir(self) -> str:
        return self.root


def artifact_actor(root: str, namespace: str):
    """The orchestrator's artifact actor, created on first use."""
    return ArtifactActor.options(
        name=ACTOR_NAME,
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
        resources=_head_node_resource(),
        max_concurrency=1000,
    ).remote(root)


def _head_node_resource() -> dict[str, float]:
    try:
        if "node:__internal_head__" in ray.cluster_resources():
            return {"node:__internal_head__": 0.001}
    except Exception:  # not connected yet: let Ray place it
        pass
    return {}
