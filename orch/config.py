"""Orchestrator configuration: strict schema, YAML loading, GPU policy.

Every model refuses unknown keys and the error names the path of the bad key
(``pools[0].engnie: unknown key``), so a typo can never silently fall back to a default.
GPU-only is the default policy: a pool with ``num_gpus: 0`` must say ``allow_cpu: true``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FieldSerializationInfo,
    SecretStr,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from orch.api.tasks import ID_PATTERN, Engine
from orch.core.queue import QueuePolicy

#: Engines a pool can host today.
POOL_ENGINES = (Engine.llamacpp, Engine.vllm, Engine.external, Engine.mock)


class ConfigError(ValueError):
    """A configuration that cannot run; the message says where and what to fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QueueConfig(_Strict):
    capacity: int = Field(default=32, ge=1, le=1_000_000)
    policy: QueuePolicy = QueuePolicy.reject


class PoolConfig(_Strict):
    id: str = Field(pattern=ID_PATTERN)
    engine: Engine
    #: Model reference (see orch.core.model_ref for the accepted forms).
    model: str = Field(min_length=1)
    #: Other names clients may use in ``model_ref`` for this pool's model.
    model_aliases: list[str] = Field(default_factory=list)
    num_gpus: float = Field(default=1, ge=0)
    num_cpus: float = Field(default=1, ge=0)
    #: CPU inference is refused unless a pool opts in.
    allow_cpu: bool = False
    #: Tasks decoded at the same time.
    slots: int = Field(default=1, ge=1, le=256)
    #: Context per slot; defaults to the model's trained context, capped at 4096.
    ctx: Optional[int] = Field(default=None, ge=64)
    max_tokens_out: Optional[int] = Field(default=None, ge=1)
    #: CPU threads per slot (llama.cpp); defaults to the pool's num_cpus, at least 1.
    threads: Optional[int] = Field(default=None, ge=1, le=512)
    queue: QueueConfig = QueueConfig()
    #: Engine-specific settings (llama.cpp: n_batch, flash_attn...; mock: tokens_per_s,
    #: first_token_ms, fail_load); an engine refuses options it does not know.
    engine_options: dict[str, Any] = Field(default_factory=dict)
    #: Seconds a finished task's events stay available to late or resuming streams.
    retain_finished_s: float = Field(default=300, gt=0)
    #: A running task whose engine produces nothing for this long ends with DECODE_TIMEOUT
    #: (prefill included, so leave room for long prompts); none: only deadlines are watched.
    stall_timeout_s: Optional[float] = Field(default=None, gt=0)
    #: Seconds an engine gets to hand a slot back after its task ended (deadline, cancel,
    #: drain); past that the engine counts as hung, the pool stops taking work and is
    #: restarted. Long, because an engine only stops at its next token, and the prefill of a
    #: long prompt on a large model emits none for a while.
    stuck_slot_grace_s: float = Field(default=60, gt=0)
    #: Identical pools to run; more than one makes a replica set whose members are named
    #: ``<id>-0``, ``<id>-1``... (a pin to ``<id>`` takes any member).
    replicas: int = Field(default=1, ge=1, le=256)
    #: The replica set a pool belongs to (set when ``replicas`` is expanded; defaults to the id).
    replica_set: Optional[str] = Field(default=None, pattern=ID_PATTERN)
    #: VRAM per GPU, for placement and the fit check where NVML cannot read it (other
    #: vendors' GPUs, a simulated cluster); NVML's numbers win when it can.
    gpu_memory_bytes: Optional[int] = Field(default=None, ge=1)
    #: Extra Ray resources the pool actor asks for (custom node labels, accelerator types).
    resources: dict[str, float] = Field(default_factory=dict)
    #: Ray node id the pool must run on; none: wherever its resources fit.
    node_id: Optional[str] = Field(default=None, pattern=r"^[0-9a-f]{56}$")

    @model_validator(mode="after")
    def _gpu_policy(self) -> "PoolConfig":
        if self.engine not in POOL_ENGINES:
            served = ", ".join(e.value for e in POOL_ENGINES)
            raise ValueError(f"engine '{self.engine.value}' cannot host a pool yet; supported: {served}")
        if self.num_gpus == 0 and not self.allow_cpu:
            raise ValueError(
                f"pool '{self.id}' asks for no GPU, and CPU inference is off by default; "
                "set num_gpus to the GPUs it needs, or allow_cpu: true to run it on CPU"
            )
        return self


class ServerConfig(_Strict):
    #: The address clients reach; keep it equal to the Serve proxy's ``http_options.host``.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    #: Largest request body accepted, in bytes.
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    #: Seconds the ingress trusts its pool snapshot before refreshing it.
    snapshot_ttl_s: float = Field(default=0.25, gt=0, le=60)
    #: Ingress replicas; any replica can stream or cancel any task.
    num_replicas: int = Field(default=1, ge=1, le=64)
    #: CPUs Ray reserves for each ingress replica (it relays; it does not compute).
    replica_num_cpus: float = Field(default=0.25, ge=0, le=16)
    #: Bearer token every request must carry. Required when the service binds beyond
    #: loopback. Prefer ``auth_token_env`` (the name of an environment variable holding it)
    #: so the token stays out of config files.
    auth_token: Optional[SecretStr] = Field(default=None, min_length=16)
    auth_token_env: Optional[str] = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    #: Clients on loopback need no token (the home profile); off: everyone needs it.
    loopback_bypass: bool = True
    #: Origins allowed to call the API from a browser (CORS); empty: CORS off.
    cors_origins: list[str] = Field(default_factory=list, max_length=32)

    @model_validator(mode="after")
    def _token_from_env(self) -> "ServerConfig":
        if self.auth_token is None and self.auth_token_env:
            value = os.environ.get(self.auth_token_env, "")
            if len(value) < 16:
                raise ValueError(
                    f"auth_token_env names {self.auth_token_env}, which is unset or shorter than 16 characters"
                )
            object.__setattr__(self, "auth_token", SecretStr(value))
        return self

    @field_validator("cors_origins")
    @classmethod
    def _local_origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if not origin.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
                raise ValueError(f"CORS origin {origin!r} is not a localhost origin; only local tooling may be allowed")
        return value

    @field_serializer("auth_token")
    def _reveal_only_on_purpose(self, value: Optional[SecretStr], info: FieldSerializationInfo):
        if value is None:
            return None
        if info.context and info.context.get("reveal_secrets"):
            return value.get_secret_value()
        return value

    def token(self) -> Optional[str]:
        return self.auth_token.get_secret_value() if self.auth_token else None


class ArtifactsConfig(_Strict):
    #: Where artifacts (task transcripts included) are written; relative paths are taken
    #: from the directory the service is started in.
    root: str = Field(default=".runtime/artifacts", validate_default=True, min_length=1)

    @field_validator("root")
    @classmethod
    def _absolute(cls, value: str) -> str:
        return str(Path(value).expanduser().resolve())


#: Schemes the outbound policy can allow (the ref forms that fetch over the network).
FETCH_SCHEMES = ("hf", "https", "http", "s3", "oci")


class OutboundPolicy(_Strict):
    """What model provisioning may fetch from the network."""

    #: Off: every ref that needs a download is refused at once; local files still work.
    allow_downloads: bool = True
    #: Hosts downloads may reach (``example.com``, or ``*.example.com`` for its subdomains);
    #: empty: any host. Hub downloads redirect to CDN hosts, which must be listed too.
    allowed_hosts: list[str] = Field(default_factory=list, max_length=256)
    #: Ref schemes that may be fetched. Plain ``http`` only ever reaches loopback hosts.
    allowed_schemes: list[str] = Field(default_factory=lambda: list(FETCH_SCHEMES), min_length=1)
    #: Seconds any single network operation may take: a connect, or a read that gets no byte.
    timeout_s: float = Field(default=30, gt=0, le=600)
    #: PEM bundle of the CAs trusted for https downloads (a private mirror); none: the system's.
    ca_bundle: Optional[str] = None

    @field_validator("allowed_hosts")
    @classmethod
    def _host_patterns(cls, value: list[str]) -> list[str]:
        import re

        pattern = re.compile(r"^(\*\.)?[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$|^[0-9a-f:.]+$")
        out = []
        for host in value:
            lowered = host.strip().lower()
            if not pattern.match(lowered):
                raise ValueError(f"allowed host {host!r} must be a host name, an IP address or *.domain (no scheme, port or path)")
            out.append(lowered)
        return out

    @field_validator("allowed_schemes")
    @classmethod
    def _known_schemes(cls, value: list[str]) -> list[str]:
        for scheme in value:
            if scheme not in FETCH_SCHEMES:
                raise ValueError(f"scheme {scheme!r} is not a fetch scheme; choose from {', '.join(FETCH_SCHEMES)}")
        return value

    @field_validator("ca_bundle")
    @classmethod
    def _absolute_bundle(cls, value: Optional[str]) -> Optional[str]:
        return None if value is None else str(Path(value).expanduser().resolve())


class CatalogConfig(_Strict):
    #: Where the catalog's records and index live; relative paths are taken from the
    #: directory the service is started in (like ``artifacts.root``).
    root: str = Field(default=".runtime/catalog", validate_default=True, min_length=1)
    #: Where downloaded models are cached on each node that provisions one.
    model_cache: str = Field(default=".runtime/models", validate_default=True, min_length=1)
    outbound: OutboundPolicy = OutboundPolicy()
    #: The Hugging Face Hub endpoint for ``hf:`` refs (a mirror); none: huggingface-hub's
    #: own default, which honours ``HF_ENDPOINT``.
    hf_endpoint: Optional[str] = Field(default=None, pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$")
    #: Longest a provisioning request waits for its download before answering.
    provision_timeout_s: float = Field(default=3600, gt=0, le=7 * 24 * 3600)
    #: A task for a pool that waits for its model starts the model's fetch (when the outbound
    #: policy allows it); off: only POST /v2/catalog/models or a handoff provides the model.
    fetch_on_demand: bool = True
    #: Where provisioned engines (downloaded binaries, source builds) are kept on each node.
    engine_cache: str = Field(default=".runtime/engine-cache", validate_default=True, min_length=1)
    #: Watched directory of handoff files (JSON; see orch/catalog/handoff_files.py).
    handoff_dir: str = Field(default=".runtime/engines", validate_default=True, min_length=1)

    @field_validator("root", "model_cache", "engine_cache", "handoff_dir")
    @classmethod
    def _absolute(cls, value: str) -> str:
        return str(Path(value).expanduser().resolve())


class SessionBudgetsConfig(_Strict):
    """Limits per session; a budget left out is not limited."""

    #: tokens_in + tokens_out over the session's turns.
    tokens: Optional[int] = Field(default=None, ge=1)
    #: decode_time_ms over the session's turns.
    time_ms: Optional[int] = Field(default=None, ge=1)
    #: Spend over the session's turns, in the unit of the prices below.
    cost: Optional[float] = Field(default=None, gt=0)
    cost_per_1k_tokens_in: float = Field(default=0, ge=0)
    cost_per_1k_tokens_out: float = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _priced(self) -> "SessionBudgetsConfig":
        if self.cost is not None and self.cost_per_1k_tokens_in == 0 and self.cost_per_1k_tokens_out == 0:
            raise ValueError("a cost budget needs a price: set cost_per_1k_tokens_in and/or cost_per_1k_tokens_out")
        return self


class SessionsConfig(_Strict):
    #: Seconds a session lives after its last activity (a turn admitted or finished).
    ttl_s: float = Field(default=600, gt=0, le=30 * 24 * 3600)
    #: Tasks a session may run; the next one is refused with BUDGET_EXCEEDED.
    max_turns: int = Field(default=8, ge=1, le=1_000_000)
    budgets: Optional[SessionBudgetsConfig] = None


class SupervisionConfig(_Strict):
    """How the supervisor restarts failed pools (see orch/core/supervision.py)."""

    #: First restart delay; doubles per consecutive failure up to ``backoff_max_s``.
    backoff_base_s: float = Field(default=1.0, gt=0, le=3600)
    backoff_max_s: float = Field(default=60.0, gt=0, le=86400)
    #: This many failures within ``breaker_window_s`` open the circuit for ``breaker_cooloff_s``.
    breaker_failures: int = Field(default=5, ge=1, le=1000)
    breaker_window_s: float = Field(default=300.0, gt=0)
    breaker_cooloff_s: float = Field(default=600.0, gt=0)
    #: A pool up this long is healthy again: its failure streak is forgotten.
    healthy_after_s: float = Field(default=30.0, gt=0)

    def policy(self) -> dict[str, float]:
        return {
            "base_s": self.backoff_base_s, "max_s": self.backoff_max_s, "breaker_failures": self.breaker_failures,
            "breaker_window_s": self.breaker_window_s, "breaker_cooloff_s": self.breaker_cooloff_s,
            "healthy_after_s": self.healthy_after_s,
        }


class OrchConfig(_Strict):
    version: int = 1
    #: Ray namespace of the pool actors; two orchestrators on one cluster need two.
    namespace: str = Field(default="orch", pattern=ID_PATTERN)
    server: ServerConfig = ServerConfig()
    artifacts: ArtifactsConfig = Field(default_factory=ArtifactsConfig)
    supervision: SupervisionConfig = SupervisionConfig()
    catalog: CatalogConfig = Field(default_factory=CatalogConfig)
    sessions: SessionsConfig = SessionsConfig()
    pools: list[PoolConfig] = Field(min_length=1)

    @field_validator("version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"config version {value} is not supported; this release reads version 1")
        return value

    @model_validator(mode="after")
    def _expand_replica_sets(self) -> "OrchConfig":
        """A pool with ``replicas: N`` becomes N pools of one replica set."""
        if all(pool.replicas == 1 and pool.replica_set for pool in self.pools):
            return self
        expanded: list[PoolConfig] = []
        for pool in self.pools:
            if pool.replicas == 1:
                expanded.append(pool if pool.replica_set else pool.model_copy(update={"replica_set": pool.id}))
                continue
            for index in range(pool.replicas):
                expanded.append(pool.model_copy(update={"id": f"{pool.id}-{index}", "replicas": 1, "replica_set": pool.id}))
        object.__setattr__(self, "pools", expanded)
        return self

    @model_validator(mode="after")
    def _unique_pool_ids(self) -> "OrchConfig":
        seen: set[str] = set()
        for pool in self.pools:
            if pool.id in seen:
                raise ValueError(f"pool id '{pool.id}' appears twice; pool ids must be unique")
            seen.add(pool.id)
        return self

    def pool(self, pool_id: str) -> PoolConfig:
        for pool in self.pools:
            if pool.id == pool_id:
                return pool
        raise KeyError(pool_id)


def _path(loc: tuple[Union[str, int], ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _explain(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        loc = _path(tuple(p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-"))))
        if item["type"] == "extra_forbidden":
            lines.append(f"{source}: {loc}: unknown key")
        elif item["type"] == "missing":
            lines.append(f"{source}: {loc}: required key is missing")
        else:
            msg = item["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "config") -> OrchConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with a 'pools' list")
    try:
        return OrchConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, source)) from None


def project_root() -> Path:
    return Path(__file__).resolve().parent.parent


def find_config_file(path: Union[str, Path]) -> Path:
    """Locate a config file: as given, then under $ORCH_HOME, then under the project root."""
    candidate = Path(path)
    if candidate.is_absolute():
        if candidate.is_file():
            return candidate
        raise ConfigError(f"config file {candidate} does not exist")
    bases = [Path.cwd()]
    if os.environ.get("ORCH_HOME"):
        bases.append(Path(os.environ["ORCH_HOME"]))
    bases.append(project_root())
    for base in bases:
        if (base / candidate).is_file():
            return (base / candidate).resolve()
    raise ConfigError(f"config file {path} not found in " + ", ".join(str(b) for b in bases))


def load_config(path: Union[str, Path]) -> OrchConfig:
    file = find_config_file(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from None
    return parse_config(data, str(file))


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind_auth(config: OrchConfig, bind_host: str) -> None:
    """The auth seam's start-up rule: beyond loopback, only with a bearer token."""
    if not is_loopback(bind_host) and config.server.auth_token is None:
        raise ConfigError(
            f"the service binds {bind_host}, which is reachable beyond this machine, and no bearer token is "
            "configured; set server.auth_token_env to the name of an environment variable holding a token "
            "(at least 16 characters), or bind 127.0.0.1"
        )


def to_wire(config: OrchConfig) -> dict[str, Any]:
    """The config as a plain dict for Ray actors and Serve replicas, secrets included."""
    return config.model_dump(mode="json", context={"reveal_secrets": True})


def check_gpu_capacity(config: OrchConfig, cluster_gpus: float) -> None:
    """GPU-only policy at start-up: fail fast when a pool wants GPUs the cluster lacks."""
    for pool in config.pools:
        if pool.num_gpus > cluster_gpus:
            raise ConfigError(
                f"pool '{pool.id}' asks for {pool.num_gpus:g} GPU(s) but the Ray cluster has "
                f"{cluster_gpus:g}; start Ray where GPUs are visible, or set num_gpus: 0 with "
                "allow_cpu: true to run this pool on CPU"
            )
    wanted = sum(pool.num_gpus for pool in config.pools)
    if wanted > cluster_gpus:
        raise ConfigError(
            f"the pools ask for {wanted:g} GPUs in all but the Ray cluster has {cluster_gpus:g}; "
            "remove pools or lower their num_gpus"
        )
