"""Ray plumbing shared by the orchestrator's named actors.

The catalog, sessions, artifacts and metrics actors are detached singletons found by name;
the ones whose state lives on disk or outlives a worker prefer the head node. A caller
keeps a handle and, when Ray says the actor behind it died (Ray or the supervisor replaced
it), looks it up by name once before giving up: the replacement answers to the same name.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any, Callable, Coroutine, Optional

import ray

log = logging.getLogger("orch.actors")

HEAD_NODE = "node:__internal_head__"


def head_node_resource() -> dict[str, float]:
    """A sliver of the head node's own resource, so Ray places the actor there; empty when
    not connected yet or the cluster has no such resource (Ray then places it anywhere)."""
    try:
        if HEAD_NODE in ray.cluster_resources():
            return {HEAD_NODE: 0.001}
    except Exception:  # not connected yet: let Ray place it
        pass
    return {}


def singleton(actor_class: Any, name: str, namespace: str, *args: Any, on_head: bool = True, **options: Any):
    """The detached actor ``name`` in ``namespace``, created with ``args`` on first use (an
    existing one is returned as it is: its constructor does not run again)."""
    if on_head:
        options.setdefault("resources", head_node_resource())
    return actor_class.options(name=name, namespace=namespace, lifetime="detached", get_if_exists=True,
                               **options).remote(*args)


def detached_task(coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task:
    """Run ``coroutine`` as a task whose Ray calls are not children of the request being
    served. Ray cancels a cancelled request's child calls with it (Serve cancels a request
    when its client goes away), so the clean-up such a request starts (cancelling its task
    on a pool) must not be one of them. Ray keeps an async actor's current task in a context
    variable; the new task gets a copy of the context without it (the log context stays)."""
    context = contextvars.copy_context()
    current = getattr(ray._raylet, "async_task_id", None)
    if isinstance(current, contextvars.ContextVar):
        context.run(current.set, None)
    else:  # another Ray: an empty context is safe, only the log context is lost
        context = contextvars.Context()
    return asyncio.get_running_loop().create_task(coroutine, context=context)


def find_actor(name: str, namespace: str):
    """The named actor if it exists, else None."""
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def stop_actor(name: str, namespace: str, finish: Optional[str] = None, timeout_s: float = 60) -> bool:
    """Stop the named actor if it exists, after calling its ``finish`` method (stop its pools,
    save its state) for at most ``timeout_s``; says whether there was one to stop."""
    actor = find_actor(name, namespace)
    if actor is None:
        return False
    if finish is not None:
        try:
            ray.get(getattr(actor, finish).remote(), timeout=timeout_s)
        except Exception as exc:  # it is killed regardless
            log.warning("%s did not finish %s before stopping: %s", name, finish, exc)
    ray.kill(actor, no_restart=True)
    return True


class ActorClient:
    """Calls into one named actor through a cached handle.

    ``connect`` (blocking; run in a thread) returns a handle: it finds the actor by name, or
    creates it. A call that meets ``RayActorError`` drops the handle, connects again and
    retries once when ``retry`` is set; the second failure (or the first, without retry) is
    passed to ``lost``, whose exception is raised (the ``RayActorError`` itself without one).
    A ``timeout`` bounds each attempt (``asyncio.TimeoutError`` is not retried).
    """

    def __init__(self, connect: Callable[[], Any], *, retry: bool = True,
                 lost: Optional[Callable[[BaseException], BaseException]] = None,
                 timeout: Optional[float] = None) -> None:
        self._connect = connect
        self.retry = retry
        self._lost = lost
        self.timeout = timeout
        self.handle: Any = None
        self._connecting = asyncio.Lock()

    async def get(self) -> Any:
        """The handle, connecting first when there is none."""
        if self.handle is None:
            async with self._connecting:
                if self.handle is None:
                    self.handle = await asyncio.to_thread(self._connect)
        return self.handle

    def forget(self) -> None:
        self.handle = None

    async def call(self, method: str, *args: Any, timeout: Optional[float] = None, **kwargs: Any) -> Any:
        timeout = self.timeout if timeout is None else timeout
        for attempt in range(2 if self.retry else 1):
            handle = await self.get()
            try:
                pending = getattr(handle, method).remote(*args, **kwargs)
                return await (asyncio.wait_for(pending, timeout) if timeout is not None else pending)
            except ray.exceptions.RayActorError as exc:
                if self.handle is handle:
                    self.handle = None
                if attempt or not self.retry:
                    if self._lost is None:
                        raise
                    raise self._lost(exc) from None
        raise AssertionError("unreachable")  # the last attempt returns or raises
