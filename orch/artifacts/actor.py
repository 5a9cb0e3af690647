"""Ray shell around the artifact store: one named, detached actor per orchestrator.

Pools send task transcripts here and every ingress replica reads from here, so an artifact
written on any node is readable through any replica. It prefers the head node, whose disk
outlives worker nodes.
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional

import ray

from orch.actors import singleton
from orch.artifacts.store import ArtifactStore

ACTOR_NAME = "orch-artifacts"
#: How long a read waits for an artifact that a pool is writing right now (a client that
#: fetches a transcript the moment its stream ends).
PENDING_WAIT_S = 2.0


@ray.remote(num_cpus=0)
class ArtifactActor:
    def __init__(self, root: str) -> None:
        self.store = ArtifactStore(root)
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


def artifact_actor(root: str, namespace: str):
    """The orchestrator's artifact actor, created on first use."""
    return singleton(ArtifactActor, ACTOR_NAME, namespace, root, max_concurrency=1000)
