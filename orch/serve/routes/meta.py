"""Discovery: capabilities of the pools, version and build of the service, the OpenAPI document."""

from __future__ import annotations

import functools
import os
import subprocess
from typing import Any, Callable, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from orch.api.meta import API_VERSION, Capabilities, PoolCapabilities, VersionInfo
from orch.api.pools import PoolView
from orch.config import project_root
from orch.core import engine_features
from orch.core.tools import template_family
from orch.serve.routing import ApiRoute
from orch.serve.state import IngressState

BASE_FEATURES = ("streaming", "cancel", "seed", "resume", "priorities", "placement_overrides", "transcripts", "n")
#: Features that follow from a parameter the pool's engine honours.
OUTPUT_FEATURES = (("logprobs", "logprobs"), ("prompt_logprobs", "prompt_logprobs"),
                   ("structured_output", "json_schema"), ("grammar", "grammar"))


def pool_features(row: PoolView, parameters: frozenset[str], template: Optional[str] = None) -> list[str]:
    """``template``: the pool's chat template when this ingress has fetched it. Forced tool
    calls (``tool_choice`` required or a named function) are constrained by JSON schema, so
    they work wherever structured output does; ``tool_choice: auto`` needs a template whose
    call format is recognised (orch/core/tools.py)."""
    features = list(BASE_FEATURES)
    features += [name for name, needs in OUTPUT_FEATURES if needs in parameters]
    if row.has_chat_template:
        features.append("chat_template")
    if "json_schema" in parameters and row.has_chat_template:
        features.append("tools")
        if template_family(template)[1] is not None:
            features.append("tool_choice_auto")
    if "embedding" in row.workloads:
        features.append("embeddings")
    if row.slots == 1:
        features.append("deterministic_single_slot")
    return features


@functools.lru_cache(maxsize=1)
def version_info() -> VersionInfo:
    from importlib.metadata import PackageNotFoundError, version

    try:
        package_version = version("llama-orch")
    except PackageNotFoundError:
        package_version = "0+unknown"
    commit = os.environ.get("ORCH_BUILD_COMMIT") or _git("rev-parse", "HEAD")
    built = os.environ.get("ORCH_BUILD_TIME") or _git("show", "-s", "--format=%cI", "HEAD")
    return VersionInfo(api_version=API_VERSION, package_version=package_version, build_commit=commit, build_time=built)


def _git(*args: str) -> str | None:
    root = project_root()
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def routes(state: IngressState, openapi: Callable[[], dict[str, Any]]) -> list[ApiRoute]:
    registry = state.registry

    async def capabilities(request: Request) -> Response:
        rows = await registry.rows()
        pools = []
        for pool in state.config.pools:
            row = rows[pool.id]  # every configured pool has a row (a made-up one while it is down)
            parameters = engine_features.supported(engine_features.variant(pool.engine.value, pool.engine_options))
            detail = registry.model_detail(pool.id)
            pools.append(PoolCapabilities(
                pool_id=pool.id,
                ready=row.ready,
                engine=pool.engine.value,
                engine_version=row.engine_version,
                model=row.model_ref,
                ctx_max=row.ctx_max,
                # Without a configured cap, output is bounded only by the context.
                max_tokens_out=pool.max_tokens_out or row.ctx_max,
                slots=pool.slots,
                workloads=list(row.workloads),
                features=pool_features(row, parameters, detail.chat_template if detail is not None else None),
                parameters=sorted(parameters),
            ))
        models = (await registry.demand.state())["models"] if registry.demand is not None else []
        return JSONResponse(Capabilities(api_version=API_VERSION, pools=pools, models=models).model_dump())

    async def version(request: Request) -> Response:
        return JSONResponse(version_info().model_dump())

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(openapi())

    return [
        ApiRoute("GET", "/v2/meta/capabilities", capabilities, "What each pool serves and supports", "meta",
                 answers={200: Capabilities}, errors=(401,), scope=None),
        ApiRoute("GET", "/v2/meta/version", version, "API version, package version and build", "meta",
                 answers={200: VersionInfo}, errors=(401,), scope=None),
        ApiRoute("GET", "/openapi.json", openapi_json, "This document", "meta",
                 answers={200: ("application/json", "OpenAPI 3.1 document")}, errors=(401,), scope=None),
    ]
