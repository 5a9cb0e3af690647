"""Liveness and readiness."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from orch.observability.exposition import render
from orch.serve.routing import ApiRoute
from orch.serve.state import IngressState


class Health(BaseModel):
    """The ingress answers."""

    status: str


class PoolReadiness(BaseModel):
    ready: bool
    draining: bool
    last_error: str | None = None


class Readiness(BaseModel):
    """Ready when at least one pool admits work (503 otherwise, same body)."""

    ready: bool
    pools: dict[str, PoolReadiness]


def routes(state: IngressState) -> list[ApiRoute]:
    registry = state.registry

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        rows = await registry.rows()
        pools = {pid: {"ready": row.ready, "draining": row.draining, "last_error": row.last_error}
                 for pid, row in rows.items()}
        ready = any(p["ready"] and not p["draining"] for p in pools.values())
        return JSONResponse({"ready": ready, "pools": pools}, status_code=200 if ready else 503)

    async def metrics(request: Request) -> Response:
        rows, details = await asyncio.gather(registry.rows(), registry.details())
        totals: dict = {}
        if state.metrics is not None:
            try:
                totals = await state.metrics.read.remote()
            except Exception:  # the totals actor is restarting: pools' series still count
                totals = {}
        try:
            totals = dict(totals, tenants=await state.service.limits.tenant_totals())
        except Exception:  # the limiter is restarting: the other series still count
            pass
        if registry.demand is not None:
            totals = dict(totals, models=await registry.demand.state(max_age_s=0))
        catalog = totals.get("verifications", {})
        return Response(render(rows, details, totals, catalog), media_type="text/plain; version=0.0.4; charset=utf-8")

    return [
        ApiRoute("GET", "/metrics", metrics, "Prometheus metrics of every pool and of placement", "operations",
                 answers={200: ("text/plain", "Prometheus text exposition")}, errors=(401,), scope="admin"),
        ApiRoute("GET", "/healthz", healthz, "Liveness of the ingress", "operations", answers={200: Health}, errors=(),
                 scope=None),
        ApiRoute("GET", "/readyz", readyz, "Readiness: some pool admits work", "operations",
                 answers={200: Readiness, 503: Readiness}, errors=(), scope=None),
    ]
