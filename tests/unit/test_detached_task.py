"""orch.actors.detached_task: a clean-up task whose Ray calls are not the current request's
children (Ray cancels those with the request), keeping the rest of the context."""

from __future__ import annotations

import asyncio
import contextvars

import ray

from orch.actors import detached_task

CORRELATION = contextvars.ContextVar("test_correlation", default=None)


def test_a_detached_task_leaves_rays_request_behind_and_keeps_the_log_context():
    ray_task_id = ray._raylet.async_task_id  # where Ray keeps an async actor's current request

    async def scenario():
        ray_task_id.set("request-being-cancelled")
        CORRELATION.set("corr-1")

        async def seen():
            return ray_task_id.get(), CORRELATION.get()

        plain = await asyncio.get_running_loop().create_task(seen())
        detached = await detached_task(seen())
        return plain, detached, ray_task_id.get()

    plain, detached, after = asyncio.run(scenario())
    assert plain == ("request-being-cancelled", "corr-1")  # a plain task's calls would be the request's
    assert detached == (None, "corr-1")
    assert after == "request-being-cancelled"  # the request's own context is untouched
