"""Ray shell around the session book: one named, detached actor per orchestrator.

Every ingress replica checks and records turns here and every pool reports each finished
task's usage here, so a session's turns and budgets are the same whichever replica
answers. Its methods are coroutines without awaits, so each runs whole on the actor's
event loop: a check never sees half of an update. It prefers the head node, which
outlives worker nodes.
"""

from __future__ import annotations

from typing import Any, Optional

import ray

from orch.actors import find_actor, singleton
from orch.core.sessions import SessionBook, SessionPolicy, TurnCheck

ACTOR_NAME = "orch-sessions"


@ray.remote(num_cpus=0)
class SessionsActor:
    def __init__(self, policy: SessionPolicy) -> None:
        self.book = SessionBook(policy)

    async def configure(self, policy: SessionPolicy) -> None:
        self.book.configure(policy)

    async def check(self, session_id: str, max_tokens: int, deadline_ms: Optional[int]) -> TurnCheck:
        """The turn's context, or its refusal (the ingress answers with it)."""
        return self.book.check_turn(session_id, max_tokens=max_tokens, deadline_ms=deadline_ms)

    async def record_turn(self, session_id: str, pool_id: str) -> None:
        self.book.record_turn(session_id, pool_id)

    async def record_usage(self, session_id: str, tokens_in: int, tokens_out: int, decode_time_ms: int) -> bool:
        return self.book.record_usage(session_id, tokens_in=tokens_in, tokens_out=tokens_out,
                                      decode_time_ms=decode_time_ms)

    async def info(self, session_id: str) -> Optional[dict[str, Any]]:
        return self.book.info(session_id)

    async def delete(self, session_id: str) -> bool:
        return self.book.delete(session_id)

    async def count(self) -> int:
        return len(self.book)


def sessions_actor(namespace: str, policy: SessionPolicy):
    """The orchestrator's sessions actor, created with ``policy`` on first use (an existing
    one keeps its own until ``configure`` is called)."""
    return singleton(SessionsActor, ACTOR_NAME, namespace, policy, max_concurrency=1000)


def find_sessions_actor(namespace: str):
    """The sessions actor if it exists, else None: a task can only belong to a live
    session after an ingress created the actor, so finding none means nothing to record."""
    return find_actor(ACTOR_NAME, namespace)
