"""Operator control of pools: health, drain, reload, purge."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from orch.api.control import (
    DrainAccepted,
    DrainRequest,
    PoolHealth,
    PurgeResult,
    ReloadRequest,
    ReloadResult,
    pool_health,
)
from orch.api.errors import ErrorCode
from orch.core.errors import OrchError
from orch.serve.http import explain_validation, invalid, read_json
from orch.serve.routes.tasks import path_id
from orch.serve.routing import ApiRoute
from orch.serve.state import IngressState

#: A reload loads a model; allow it the time a large one takes.
RELOAD_TIMEOUT_S = 900.0


def routes(state: IngressState) -> list[ApiRoute]:
    registry = state.registry
    config = state.config
    max_body = config.server.max_body_bytes

    def pool_of(request: Request, model_pools: bool = False) -> str:
        """A configured pool (``model_pools``: or a loaded model's pool, whose lifecycle the
        model set owns, so operators only read its health)."""
        pool_id = path_id(request, "pool_id", "pool")
        if model_pools and pool_id in registry.pool_ids():
            return pool_id
        if pool_id not in {pool.id for pool in config.pools}:
            known = ", ".join(pool.id for pool in config.pools)
            raise OrchError(ErrorCode.NOT_FOUND, f"no pool '{pool_id}'; configured pools: {known}")
        return pool_id

    async def call(pool_id: str, method: str, *args: Any, timeout: float = 30.0) -> Any:
        return await registry.pools.call(pool_id, method, *args, timeout=timeout)

    async def optional_body(request: Request, model):
        raw = await request.body()
        if not raw.strip():
            return model()
        body = await read_json(request, max_body)
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            raise invalid(explain_validation(exc)) from None

    async def health(request: Request) -> Response:
        pool_id = pool_of(request, model_pools=True)
        try:
            snap = await registry.pools.report(pool_id, timeout=5.0)
            body = pool_health(snap.view, snap.detail, live=True)
        except OrchError as exc:
            row = (await registry.rows()).get(pool_id)
            if row is None:  # a model's pool, unloaded meanwhile
                raise OrchError(ErrorCode.NOT_FOUND, f"no pool '{pool_id}' (its model was unloaded)") from None
            body = pool_health(replace(row, last_error=exc.message, ready=False, active_slots=0), None, live=False)
        return JSONResponse(body.model_dump())

    async def drain(request: Request) -> Response:
        pool_id = pool_of(request)
        body = await optional_body(request, DrainRequest)
        result = await call(pool_id, "drain", body.deadline_ms)
        await registry.refresh(force=True)
        return JSONResponse(DrainAccepted(**result).model_dump(), status_code=202)

    async def reload(request: Request) -> Response:
        pool_id = pool_of(request)
        body = await read_json(request, max_body)
        try:
            wanted = ReloadRequest.model_validate(body)
        except ValidationError as exc:
            raise invalid(explain_validation(exc)) from None
        result = await call(pool_id, "reload", wanted.new_model_ref, timeout=RELOAD_TIMEOUT_S)
        await registry.refresh(force=True)
        if not result.get("reloaded"):
            raise OrchError(ErrorCode.INVALID_PARAMS, f"pool '{pool_id}': {result.get('error')}", pool_id=pool_id,
                            retriable=False)
        return JSONResponse(ReloadResult(**{k: v for k, v in result.items() if k != "error"}).model_dump())

    async def purge(request: Request) -> Response:
        pool_id = pool_of(request)
        result = await call(pool_id, "purge")
        await registry.refresh(force=True)
        return JSONResponse(PurgeResult(**result).model_dump(), status_code=202)

    return [
        ApiRoute("GET", "/v2/pools/{pool_id}/health", health, "A pool's liveness, readiness, drain state, last error and metrics",
                 "pools", answers={200: PoolHealth}, scope="admin"),
        ApiRoute("POST", "/v2/pools/{pool_id}/drain", drain,
                 "Stop admitting; finish queued and running work (until deadline_ms)", "pools",
                 body=DrainRequest, answers={202: DrainAccepted}, scope="admin"),
        ApiRoute("POST", "/v2/pools/{pool_id}/reload", reload,
                 "Swap the pool's model atomically (Ready on the new one, or rolled back to the old one)", "pools",
                 body=ReloadRequest, answers={200: ReloadResult}, scope="admin"),
        ApiRoute("POST", "/v2/pools/{pool_id}/purge", purge,
                 "Remove every queued task (each gets a retriable error) and forget finished ones", "pools",
                 answers={202: PurgeResult}, scope="admin"),
    ]
