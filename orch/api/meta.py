"""Discovery contract: what this orchestrator and its pools can do."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, Field

from orch.api.models import ModelStatus

#: Version of the HTTP API; equals the OpenAPI document's ``info.version``.
API_VERSION = "2.1.0"


class PoolCapabilities(BaseModel):
    pool_id: str
    ready: bool
    engine: str
    engine_version: str
    model: str
    ctx_max: int
    max_tokens_out: int
    slots: int
    workloads: list[str]
    features: list[str]
    #: The request parameters its engine honours (orch.core.engine_features); a request
    #: setting any other is refused with a 400 naming it.
    parameters: list[str] = Field(default_factory=list)


class Capabilities(BaseModel):
    """``GET /v2/meta/capabilities``."""

    api_version: str
    pools: list[PoolCapabilities]
    #: The configured model set (models on demand), loaded or not; empty without one.
    models: list[ModelStatus] = Field(default_factory=list)


class VersionInfo(BaseModel):
    """``GET /v2/meta/version``."""

    api_version: str
    package_version: str
    build_commit: Optional[str] = None
    build_time: Optional[str] = None
