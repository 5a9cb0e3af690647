"""The ingress's side of sessions: the ``SessionGate`` of ``TaskService`` over the shared
``orch-sessions`` actor, plus the reads behind ``/v2/sessions``.

Only ids and numbers cross to the actor (``max_tokens``, ``deadline_ms``, pool ids); the
request's prompt never leaves the ingress.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import ray

from orch.actors import ActorClient
from orch.api.errors import ErrorCode
from orch.config import SessionsConfig
from orch.core.errors import OrchError
from orch.core.sessions import SessionPolicy, TurnCheck
from orch.serve.service import AnyTask, SessionTurn
from orch.sessions.actor import sessions_actor

log = logging.getLogger("orch.ingress")


def session_policy(config: SessionsConfig) -> SessionPolicy:
    budgets = config.budgets
    if budgets is None:
        return SessionPolicy(ttl_s=config.ttl_s, max_turns=config.max_turns)
    return SessionPolicy(
        ttl_s=config.ttl_s,
        max_turns=config.max_turns,
        tokens=budgets.tokens,
        time_ms=budgets.time_ms,
        cost=budgets.cost,
        cost_per_1k_tokens_in=budgets.cost_per_1k_tokens_in,
        cost_per_1k_tokens_out=budgets.cost_per_1k_tokens_out,
    )


class SessionsGate:
    def __init__(self, namespace: str, config: SessionsConfig) -> None:
        self.namespace = namespace
        self.policy = session_policy(config)
        self._client = ActorClient(self._connect)

    def _connect(self):
        """The actor, configured with this deployment's policy on this replica's first use
        (a lost actor is looked up, or re-created empty, once per call)."""
        handle = sessions_actor(self.namespace, self.policy)
        ray.get(handle.configure.remote(self.policy))
        return handle

    async def before_admit(self, session_id: str, request: AnyTask) -> SessionTurn:
        """Refuse (BUDGET_EXCEEDED) a turn the session may not take; else its last pool and
        the budgets it has left."""
        max_tokens = getattr(request, "max_tokens", None) or 0
        turn: TurnCheck = await self._call("check", session_id, max_tokens, request.deadline_ms)
        refused = turn.error()
        if refused is not None:
            raise refused
        prices = {"in": self.policy.cost_per_1k_tokens_in, "out": self.policy.cost_per_1k_tokens_out}
        return SessionTurn(turn.last_pool_id, turn.budgets, prices)

    async def after_admit(self, session_id: str, pool_id: str) -> None:
        """Count the turn. The task is already queued, so a failure here is logged, never
        raised: the client must still learn its task id."""
        try:
            await self._call("record_turn", session_id, pool_id)
        except OrchError as exc:
            log.warning("session %s: turn on pool %s not recorded: %s", session_id, pool_id, exc.message)

    async def info(self, session_id: str) -> Optional[dict[str, Any]]:
        return await self._call("info", session_id)

    async def delete(self, session_id: str) -> bool:
        return await self._call("delete", session_id)

    async def _call(self, method: str, *args: Any) -> Any:
        """One actor call; an actor still lost after one reconnect is refused as retriable."""
        try:
            return await self._client.call(method, *args)
        except ray.exceptions.RayActorError:  # the call's retry failed too, or configuring a new actor did
            raise OrchError(ErrorCode.POOL_UNAVAILABLE, "the sessions store is unreachable; retry shortly",
                            retriable=True, retry_after_ms=1000) from None
