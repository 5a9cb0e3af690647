"""The ingress's side of per-key limits: reserve before enqueue, release what was never
admitted, free slots whose end was never reported, and the ``RateLimit-*`` headers.

A request without a principal (auth off, loopback bypass) is never limited and costs no
call. One with a key costs one call to the limiter actor (orch/tenants/limiter.py) per
task; the pool settles it when the task ends.
"""

from __future__ import annotations

import asyncio
import logging
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable, Optional, Union

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orch.actors import ActorClient
from orch.api.errors import ErrorCode
from orch.api.keys import Principal
from orch.api.tasks import EmbeddingRequest, TaskRequest
from orch.config import OrchConfig
from orch.core.errors import OrchError
from orch.core.limits import Verdict, estimate_tokens
from orch.serve.pool_client import PoolClient, PoolLost, PoolNotRunning
from orch.tenants.limiter import find_limiter, limiter_actor

log = logging.getLogger("orch.ingress")

#: Seconds between two rounds of the reaper (slots of tasks whose end was never reported).
REAP_EVERY_S = 15.0
#: The label per-tenant series use for a tenant the config does not declare.
OTHER_TENANT = "other"

#: The request's ``RateLimit-*`` headers, filled by admission, written by ``RateLimitHeaders``.
RATE_HEADERS: ContextVar[Optional[dict[str, str]]] = ContextVar("orch_rate_headers", default=None)


class RateLimited(OrchError):
    """429 RATE_LIMITED naming the limit (``policy_label``), with its headers."""

    def __init__(self, verdict: Verdict) -> None:
        quota = verdict.quota
        retry_s = max(1, verdict.retry_after_s or 1)
        super().__init__(ErrorCode.RATE_LIMITED, f"rate limited ({quota.label if quota else 'limit'}): "
                         f"{verdict.message}" + (f"; retry in {retry_s} s" if verdict.retriable else ""),
                         retriable=verdict.retriable, retry_after_ms=retry_s * 1000,
                         policy_label=quota.label if quota else None)
        self.headers = verdict.headers()


def task_estimate(task: Union[TaskRequest, EmbeddingRequest]) -> int:
    """Tokens a task may spend, before the pool has tokenized its prompt."""
    chars = sum(len(text) for text in (getattr(task, "inputs", None) or ()))
    if isinstance(task, TaskRequest):
        return estimate_tokens(chars + len(task.prompt), task.max_tokens)
    return estimate_tokens(chars, 0)


class TenantLimits:
    def __init__(self, config: OrchConfig, pools: PoolClient) -> None:
        self.config = config
        self.pools = pools
        namespace = config.namespace
        usage_path = str(Path(config.tenants.key_store).parent / "usage.json")
        self._client = ActorClient(lambda: limiter_actor(namespace, usage_path), timeout=5.0, lost=_limiter_lost)
        self._reaper: Optional[asyncio.Task] = None
        self._pending: set[asyncio.Future] = set()

    def tenant_label(self, tenant: str) -> str:
        """The tenant as per-tenant series name it: declared ones by name, the rest ``other``."""
        return tenant if tenant in self.config.tenants.names() else OTHER_TENANT

    async def admit(self, principal: Optional[Principal], task: Union[TaskRequest, EmbeddingRequest],
                    task_id: str) -> Optional[str]:
        """Reserve ``task_id`` against the key's limits: the key id that holds it, None
        without a principal; raises ``RateLimited`` over a limit."""
        if principal is None:
            return None
        self._start_reaper()
        try:
            wire = await self._client.call("reserve", principal.key_id, principal.tenant,
                                           principal.limits.model_dump(), task_id, task_estimate(task))
        except asyncio.TimeoutError:
            raise _limiter_lost(None) from None
        verdict = Verdict.from_wire(wire)
        holder = RATE_HEADERS.get()
        if holder is not None:
            holder.clear()
            holder.update(verdict.headers())
        if verdict.duplicate:
            raise OrchError(ErrorCode.INVALID_PARAMS, f"{verdict.message}; pick another or leave it out")
        if not verdict.allowed:
            raise RateLimited(verdict)
        return principal.key_id

    def release(self, task_id: str, exc: BaseException) -> None:
        """Give back a reservation the task never used (refused after the limiter admitted
        it); off the request path."""
        refused_by = exc.code.value if isinstance(exc, OrchError) else None
        pending = asyncio.ensure_future(self._quietly("release", task_id, refused_by))
        self._pending.add(pending)  # held until done: the loop keeps only weak references
        pending.add_done_callback(self._pending.discard)

    async def usage(self, key_id: str, limits: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        return await self._client.call("usage", key_id, limits)

    async def tenant_totals(self) -> dict[str, dict[str, Any]]:
        """Totals by tenant label (undeclared tenants summed as ``other``); empty while no
        key was ever used (the limiter is created by the first request with a key)."""
        if self._client.handle is None and await asyncio.to_thread(find_limiter, self.config.namespace) is None:
            return {}
        return by_label(await self._client.call("tenant_totals"), self.tenant_label)

    async def _quietly(self, method: str, *args: Any) -> Any:
        try:
            return await self._client.call(method, *args)
        except Exception as exc:  # the reaper frees what a lost call leaves behind
            log.warning("limiter %s failed: %s", method, exc)
            return None

    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(REAP_EVERY_S)
            try:
                await self.reap_once()
            except Exception as exc:  # never stop reaping
                log.warning("limiter reaper round failed: %s", exc)

    async def reap_once(self) -> int:
        """Free the slots of old reservations whose task no pool holds any more."""
        stale = await self._client.call("claim_stale")
        if not stale:
            return 0
        gone = [task_id for task_id, lost in zip(stale, await asyncio.gather(*(self._gone(t) for t in stale))) if lost]
        return await self._client.call("reap", gone) if gone else 0

    async def _gone(self, task_id: str) -> bool:
        pool_ids = [pool.id for pool in self.config.pools]
        answers = await asyncio.gather(*(self.pools.has_task(pid, task_id) for pid in pool_ids),
                                       return_exceptions=True)
        return all(answer is False or isinstance(answer, (PoolNotRunning, PoolLost)) for answer in answers)


def by_label(totals: dict[str, dict[str, Any]], label: Callable[[str], str]) -> dict[str, dict[str, Any]]:
    """Per-tenant totals summed by the tenant's label (every undeclared tenant into one)."""
    out: dict[str, dict[str, Any]] = {}
    for tenant, usage in totals.items():
        into = out.setdefault(label(tenant), {})
        for name, value in usage.items():
            if isinstance(value, dict):
                inner = into.setdefault(name, {})
                for reason, count in value.items():
                    inner[reason] = inner.get(reason, 0) + count
            else:
                into[name] = into.get(name, 0) + value
    return out


def _limiter_lost(exc: Optional[BaseException]) -> BaseException:
    return OrchError(ErrorCode.INTERNAL, "the limiter did not answer; retry the request", retriable=True,
                     retry_after_ms=1000)


class RateLimitHeaders:
    """Adds the request's ``RateLimit-*`` (and a refusal's ``Retry-After``) headers to its
    answer, success or refusal, /v2 and /v1 alike. Pure ASGI, so streams are not buffered."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        holder: dict[str, str] = {}
        token = RATE_HEADERS.set(holder)

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start" and holder:
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(name.lower().encode(), value.encode()) for name, value in holder.items()
                            if name.lower().encode() not in present]
                message = dict(message, headers=headers)
            await send(message)

        try:
            await self.app(scope, receive, send_with_limits)
        finally:
            RATE_HEADERS.reset(token)
