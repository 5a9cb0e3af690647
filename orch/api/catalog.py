"""Catalog contract: model records, provisioning requests, plans, verification."""

from __future__ import annotations

import re
from enum import Enum
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

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


# --------------------------------------------------------------------------- engines and handoffs

ENGINE_NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,31}$"
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"
#: A pip requirement: a name, optional extras and one version clause; no URLs or options.
REQUIREMENT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}(\[[A-Za-z0-9_,.-]{1,100}\])?((==|>=|<=|~=|!=|>|<)[A-Za-z0-9.*+!-]{1,64}(,(==|>=|<=|~=|!=|>|<)[A-Za-z0-9.*+!-]{1,64}){0,3})?$"
IMAGE_PATTERN = r"^[a-z0-9][a-z0-9._/:@-]{0,254}$"
CMAKE_FLAG_PATTERN = r"^-D[A-Za-z0-9_]{1,64}=[A-Za-z0-9_.+,;/-]{0,128}$"
LLAMA_CPP_GIT = "https://github.com/ggml-org/llama.cpp"


class EngineMode(str, Enum):
    """How an engine gets onto a node (see orch/provision/engines.py)."""

    external = "external"
    package = "package"
    container = "container"
    binary = "binary"
    source = "source"


class EngineSpec(BaseModel):
    """What to provision; each mode reads its own fields and refuses to run without them.

    - ``external``: ``url`` of a running OpenAI-compatible server (``http(s)://host:port``);
    - ``package``: ``package``, a pip requirement installed in the pool actor's Ray runtime_env;
    - ``container``: ``image``, the pool actor's runtime_env container image (Ray runs it with podman);
    - ``binary``: ``url`` of a prebuilt executable (or a .zip/.tar.gz holding ``target``) and
      its required ``sha256``, downloaded into the engine cache;
    - ``source``: ``source`` (a git URL, default llama.cpp's, with a pinned ``ref``; or a local
      directory as ``file:/abs/path``) built with cmake into the engine cache.
    """

    model_config = ConfigDict(extra="forbid", use_enum_values=True)

    mode: EngineMode
    engine: str = Field(default="llamacpp", pattern=ENGINE_NAME_PATTERN)
    version: Optional[str] = Field(default=None, pattern=VERSION_PATTERN)
    url: Optional[str] = Field(default=None, min_length=8, max_length=2048, pattern=r"^https?://[^\s#]+$")
    package: Optional[str] = Field(default=None, pattern=REQUIREMENT_PATTERN)
    image: Optional[str] = Field(default=None, pattern=IMAGE_PATTERN)
    sha256: Optional[str] = Field(default=None, pattern=DIGEST_PATTERN)
    source: Optional[str] = Field(default=None, min_length=1, max_length=2048)
    ref: Optional[str] = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
    cmake_flags: list[str] = Field(default_factory=list, max_length=32)
    target: str = Field(default="llama-server", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    #: external: the environment variable on the pool's node holding the upstream API key.
    api_key_env: Optional[str] = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")

    @model_validator(mode="after")
    def _fields_of_the_mode(self) -> "EngineSpec":
        mode = EngineMode(self.mode)
        needs = {
            EngineMode.external: ("url",),
            EngineMode.package: ("package",),
            EngineMode.container: ("image",),
            EngineMode.binary: ("url", "sha256"),
            EngineMode.source: (),
        }[mode]
        missing = [name for name in needs if getattr(self, name) is None]
        if missing:
            raise ValueError(f"mode '{mode.value}' needs {' and '.join(missing)}"
                             + ("; a binary is only used with its checksum" if "sha256" in missing else ""))
        for flag in self.cmake_flags:
            if not re.match(CMAKE_FLAG_PATTERN, flag):
                raise ValueError(f"cmake flag {flag[:80]!r} must look like -DNAME=value")
        if mode == EngineMode.source:
            source = self.source or LLAMA_CPP_GIT
            if source.startswith(("https://", "http://")) and self.ref is None:
                raise ValueError("a git source needs a pinned ref (a tag or commit), so the build is reproducible")
            if not source.startswith(("https://", "http://", "file:/")):
                raise ValueError("source must be a git URL (https://...) or a local directory (file:/abs/path)")
        return self


class EngineProvisionRequest(BaseModel):
    """``POST /v2/catalog/engines`` body: plan (``dry_run``) or provision an engine, then hand it off."""

    model_config = ConfigDict(extra="forbid")

    spec: EngineSpec
    id: Optional[str] = Field(default=None, pattern=ID_PATTERN, description="handoff id; default: from the plan")
    pool_id: Optional[str] = Field(default=None, pattern=ID_PATTERN, description="the pool this engine is for")
    model_ref: Optional[str] = Field(default=None, min_length=1, max_length=2048,
                                     description="the model the engine serves (pools waiting for it bind to it)")
    node_id: Optional[str] = Field(default=None, pattern=NODE_ID_PATTERN)
    dry_run: bool = Field(default=False, description="answer the plan and the preflight without running anything")


class MissingTool(BaseModel):
    tool: str
    needed_for: str
    how: str


class EnginePlanBody(BaseModel):
    """The steps provisioning an engine takes, deterministic for the same inputs, and what is
    missing on the node to take them."""

    handoff_id: str
    mode: EngineMode
    engine: str
    version: Optional[str] = None
    steps: list[PlanStep]
    tools: list[str] = Field(description="programs the steps run on the node")
    runtime_env: dict[str, Any] = Field(default_factory=dict, description="what the pool actor starts with")
    preflight_ok: Optional[bool] = None
    missing: list[MissingTool] = Field(default_factory=list)


class HandoffRecord(BaseModel):
    """What provisioning (or an operator) hands to the pools: an engine and/or a model ready to
    use. Pools bind to the handoff naming them (``pool_id``), else to one for their model ref
    and engine. Stored by the catalog like model records."""

    model_config = ConfigDict(extra="forbid", use_enum_values=True)

    schema_version: int = Field(default=SCHEMA_VERSION, ge=1)
    id: str = Field(pattern=ID_PATTERN)
    engine: str = Field(pattern=ENGINE_NAME_PATTERN)
    engine_version: Optional[str] = Field(default=None, pattern=VERSION_PATTERN)
    mode: Optional[EngineMode] = Field(default=None, description="how the engine was provisioned; none: a model only")
    url: Optional[str] = Field(default=None, max_length=2048, pattern=r"^https?://[^\s#]+$",
                               description="external: the server's base URL")
    binary_path: Optional[str] = Field(default=None, min_length=1, max_length=4096)
    package: Optional[str] = Field(default=None, pattern=REQUIREMENT_PATTERN)
    image: Optional[str] = Field(default=None, pattern=IMAGE_PATTERN)
    runtime_env: dict[str, Any] = Field(default_factory=dict, description="Ray runtime_env of the pool actor")
    api_key_env: Optional[str] = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
    model_ref: Optional[str] = Field(default=None, min_length=1, max_length=2048, description="canonical model ref")
    model_path: Optional[str] = Field(default=None, min_length=1, max_length=4096)
    model_digest: Optional[str] = Field(default=None, pattern=DIGEST_PATTERN)
    model_id: Optional[str] = Field(default=None, pattern=ID_PATTERN)
    pool_id: Optional[str] = Field(default=None, pattern=ID_PATTERN)
    node_id: Optional[str] = Field(default=None, pattern=NODE_ID_PATTERN)
    origin: str = Field(default="api", max_length=512,
                        description="provision, api, or file:<name> for a file in the handoff directory")
    created_at: float = 0.0
    updated_at: float = 0.0

    @model_validator(mode="after")
    def _hands_something_off(self) -> "HandoffRecord":
        if not (self.url or self.binary_path or self.package or self.image or self.model_path):
            raise ValueError("a handoff names an engine (url, binary_path, package, image) or a model (model_path)")
        if self.url is not None and "@" in self.url.split("/", 3)[2]:
            raise ValueError("url must not carry credentials (they would be stored and shown); use api_key_env")
        if self.model_path is not None and not self.model_path.startswith("/"):
            raise ValueError("model_path must be an absolute path")
        if self.binary_path is not None and not self.binary_path.startswith("/"):
            raise ValueError("binary_path must be an absolute path")
        return self


class HandoffList(BaseModel):
    """Every handoff record."""

    handoffs: list[HandoffRecord]
