"""The tiny Starlette app that bench/serve_proxy.py serves both through Ray Serve and under
plain uvicorn: a no-op route, a no-op POST and a small SSE route.

``uvicorn bench.proxy_app:app`` serves it directly.
"""

from __future__ import annotations

import asyncio

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route


async def noop(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def noop_post(request: Request) -> JSONResponse:
    await request.body()
    return JSONResponse({"task_id": "noop", "queue_position": 0}, status_code=202)


async def sse(request: Request) -> StreamingResponse:
    """``n`` events, the first at once, then one every ``gap_ms``."""
    n = max(1, min(int(request.query_params.get("n", "1")), 10_000))
    gap = max(0.0, min(float(request.query_params.get("gap_ms", "0")), 1000.0)) / 1000.0

    async def events():
        for i in range(n):
            if i and gap:
                await asyncio.sleep(gap)
            yield f"id: {i}\nevent: tick\ndata: {{\"i\":{i}}}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def build() -> Starlette:
    return Starlette(routes=[
        Route("/noop", noop, methods=["GET"]),
        Route("/noop", noop_post, methods=["POST"]),
        Route("/sse", sse, methods=["GET"]),
    ])


app = build()


def serve_app(access_log: bool = True, num_cpus: float = 0.1):
    """This app as a bound Ray Serve application (one replica)."""
    from ray import serve

    options: dict = {"max_ongoing_requests": 10_000, "ray_actor_options": {"num_cpus": num_cpus}}
    if not access_log:
        options["logging_config"] = {"enable_access_log": False}
    app = build()

    @serve.deployment(**options)
    @serve.ingress(app)
    class ProxyBench:
        pass

    return ProxyBench.bind()
