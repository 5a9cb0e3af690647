"""Catalog contract: model records, provisioning requests, plans, verification."""

from __future__ import annotations

from enum import Enum
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from orch.api.tasks import ID_PATTERN

DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"
NODE_ID_PATTERN = r"^[0-9a-f]{16,128}$"
#: The record layout this release writes; records with a higher version are refused.
SCHEMA_VERSION = 1


class ModelState(str, Enum):
    Active = "Active"
    Retired = "Retired"


class Verification(BaseModel):
    model_config = ConfigDict(extra="forbid")

    at: float = Field(description="seconds since the epoch")
    ok: bool
    digest: Optional[str] = Field(default=None, description="the digest computed then (none: the files were missing)")


class CatalogModel(BaseModel):
    """A model in the catalog (the on-disk record and the API answer are the same)."""

    model_config = ConfigDict(extra="forbid", use_enum_values=True)

    schema_version: int = Field(default=SCHEMA_VERSION, ge=1)
    id: str = Field(pattern=ID_PATTERN)
    ref: str = Field(min_length=1, max_length=2048, description="canonical model ref")
    source: str = Field(description="the ref's scheme: hf, https, http, file, pkg")
    local_path: str = Field(min_length=1, description="the file (or directory) on node_id")
    node_id: Optional[str] = Field(default=None, description="the Ray node whose disk holds local_path")
    managed: bool = Field(description="the catalog downloaded these files into its cache and deletes them with the "
                                      "model; false for a user's own file, which is never deleted")
    digest: str = Field(pattern=DIGEST_PATTERN, description="sha256 of the file; of a manifest for a directory")
    digest_verified: bool = Field(description="the digest was checked against one given when provisioning")
    size_bytes: int = Field(ge=0)
    ctx_max: Optional[int] = Field(default=None, ge=1, description="trained context length, from the model's metadata")
    format: str = Field(description="gguf, directory or file")
    metadata: dict[str, Any] = Field(default_factory=dict, description="GGUF header fields or HF config fields")
    revision: Optional[str] = Field(default=None, description="the commit an hf: ref resolved to")
    state: ModelState = ModelState.Active
    created_at: float
    updated_at: float
    last_verification: Optional[Verification] = None


class ModelCreate(BaseModel):
    """``POST /v2/catalog/models`` body."""

    model_config = ConfigDict(extra="forbid")

    ref: str = Field(min_length=1, max_length=2048, description="hf:, https://, file:, pkg: ... (see the model ref forms)")
    id: Optional[str] = Field(default=None, pattern=ID_PATTERN, description="catalog id; default: from the ref's name")
    digest: Optional[str] = Field(default=None, pattern=DIGEST_PATTERN,
                                  description="expected sha256; a mismatch fails and the file is removed")
    node_id: Optional[str] = Field(default=None, pattern=NODE_ID_PATTERN,
                                   description="the Ray node to provision on; default: the ingress's node")
    dry_run: bool = Field(default=False, description="answer the plan without running it")


class PlanStep(BaseModel):
    kind: str
    detail: dict[str, Any]


class ProvisionPlanBody(BaseModel):
    """The steps provisioning a ref takes (``dry_run``), deterministic for the same inputs."""

    model_id: str
    ref: str
    source: str
    managed: bool
    steps: list[PlanStep]


class ModelStateChange(BaseModel):
    """``POST /v2/catalog/models/{id}/state`` body."""

    model_config = ConfigDict(extra="forbid")

    state: ModelState


class VerifyResult(BaseModel):
    """The digest recomputed from the model's files."""

    id: str
    ok: bool
    expected: str
    actual: Optional[str] = None
    size_bytes: Optional[int] = None
    checked_at: float
    message: str = ""


class ModelList(BaseModel):
    """Every model in the catalog."""

    models: list[CatalogModel]
