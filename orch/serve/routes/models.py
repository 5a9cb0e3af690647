"""Models on demand: list the model set, load, unload, pin and unpin a model (admin)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from orch.api.errors import ErrorCode
from orch.api.models import ModelSetStatus, ModelStatus
from orch.core.errors import OrchError
from orch.serve.routes.tasks import path_id
from orch.serve.routing import ApiRoute
from orch.serve.state import IngressState


def routes(state: IngressState) -> list[ApiRoute]:
    registry = state.registry

    def demand():
        if registry.demand is None:
            raise OrchError(ErrorCode.NOT_FOUND, "no model set is configured (model_set in the config); "
                            "pools serve their configured models only")
        return registry.demand

    async def listing(request: Request) -> Response:
        if registry.demand is None:  # no model set: nothing loads on demand
            return JSONResponse(ModelSetStatus().model_dump())
        found = await registry.demand.state(max_age_s=0)
        return JSONResponse(ModelSetStatus(models=found["models"], budgets=found["budgets"]).model_dump())

    def action(method: str, *args):
        async def handler(request: Request) -> Response:
            model_id = path_id(request, "model_id", "model")
            answer = await demand().call(method, model_id, *args)
            await registry.refresh(force=True)
            status = 202 if method == "load" and answer["state"] != "loaded" else 200
            return JSONResponse(ModelStatus(**answer).model_dump(), status_code=status)
        return handler

    wait_s = state.config.model_set.max_load_wait_s if state.config.model_set else 0
    return [
        ApiRoute("GET", "/v2/models", listing, "Every model of the model set: loaded or not, where, since, last "
                 "used, pinned; and the memory budgets", "models", answers={200: ModelSetStatus}, scope=None),
        ApiRoute("POST", "/v2/models/{model_id}/load", action("load", wait_s),
                 "Load a model of the set now (evicting idle models if needed); 202 while it still loads", "models",
                 answers={200: ModelStatus, 202: ModelStatus}),
        ApiRoute("POST", "/v2/models/{model_id}/unload", action("unload", "operator"),
                 "Unload a model (its queued and running tasks end with a retriable error)", "models",
                 answers={200: ModelStatus}),
        ApiRoute("POST", "/v2/models/{model_id}/pin", action("pin", True),
                 "Pin a model: never evicted, never unloaded for idleness", "models", answers={200: ModelStatus}),
        ApiRoute("POST", "/v2/models/{model_id}/unpin", action("pin", False),
                 "Unpin a model", "models", answers={200: ModelStatus}),
    ]
