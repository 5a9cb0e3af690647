"""The configuration's schema: pools, server, artifacts, sessions, supervision, and the
whole ``OrchConfig`` (replica sets expanded, pool ids unique, local roots defaulted).

Every model refuses unknown keys and the error names the path of the bad key
(``pools[0].engnie: unknown key``), so a typo can never silently fall back to a default.
GPU-only is the default policy: a pool with ``num_gpus: 0`` must say ``allow_cpu: true``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import (
    Field,
    FieldSerializationInfo,
    SecretStr,
    field_serializer,
    field_validator,
    model_validator,
)

from orch.api.tasks import ID_PATTERN, Engine
from orch.config.base import Strict, project_root
from orch.config.catalog import CatalogConfig
from orch.config.model_set import ModelSetConfig
from orch.config.tenants import TenantsConfig
from orch.core.queue import QueuePolicy

#: Engines a pool can host today.
POOL_ENGINES = (Engine.llamacpp, Engine.vllm, Engine.external, Engine.mock)


class QueueConfig(Strict):
    capacity: int = Field(default=32, ge=1, le=1_000_000)
    policy: QueuePolicy = QueuePolicy.reject


class PoolConfig(Strict):
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
    #: Extra slots only a tenant with nothing running on the pool may take, when every
    #: slot is busy: another tenant's backlog then never makes it wait for a slot to free.
    #: The engine is sized for ``slots`` + these. Default: 1 when the config declares
    #: tenants, else 0.
    tenant_reserve_slots: Optional[int] = Field(default=None, ge=0, le=64)
    #: Context per slot; defaults to the model's trained context, capped at 4096.
    ctx: Optional[int] = Field(default=None, ge=64)
    max_tokens_out: Optional[int] = Field(default=None, ge=1)
    #: CPU threads of the engine (llama.cpp, and OpenMP for llama.cpp and vLLM); default: the CPUs
    #: Ray granted the pool actor (its num_cpus), at least 1.
    threads: Optional[int] = Field(default=None, ge=1, le=512)
    #: CPU priority of the pool's process (its engine's threads); null keeps the niceness Ray
    #: started its workers at (``RAY_worker_niceness``, 15 unless set), which Serve's proxy and
    #: the ingress share. Set lower only with care: an engine above them takes their CPU.
    niceness: Optional[int] = Field(default=None, ge=-20, le=19)
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

    @property
    def reserve_slots(self) -> int:
        return self.tenant_reserve_slots or 0

    @property
    def engine_slots(self) -> int:
        """Sequences the engine is sized for: the slots and the tenants' reserve."""
        return self.slots + self.reserve_slots


class ServerConfig(Strict):
    #: The address clients reach; keep it equal to the Serve proxy's ``http_options.host``.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    #: Largest request body accepted, in bytes.
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    #: Seconds the ingress trusts its pool snapshot before refreshing it.
    snapshot_ttl_s: float = Field(default=0.25, gt=0, le=60)
    #: After a stream's first token, the ingress fetches its tokens at most this often, so
    #: that several leave in one page and one SSE write: every delivery wakes the pool's loop,
    #: the ingress, Serve's proxy and the client, and on a small machine that CPU comes out of
    #: the engine's decode (docs/benchmarks.md, section 8). A first token never waits on it;
    #: a stream's end waits at most this long. 0: every step's tokens as they come.
    stream_interval_ms: int = Field(default=100, ge=0, le=1000)
    #: How placement ranks the pools that may take a task: ``prefix`` (expected wait minus the
    #: prefill a pool's cached prefix of the prompt saves), ``least_loaded`` (the same without
    #: the prefix), ``round_robin`` (by id, a baseline). Pins, avoid lists and masks apply to all.
    placement: Literal["prefix", "least_loaded", "round_robin"] = "prefix"
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


class ArtifactsConfig(Strict):
    #: Where artifacts (task transcripts included) are written; relative paths are taken
    #: from the directory the service is started in.
    root: str = Field(default=".runtime/artifacts", validate_default=True, min_length=1)

    @field_validator("root")
    @classmethod
    def _absolute(cls, value: str) -> str:
        return str(Path(value).expanduser().resolve())


class SessionBudgetsConfig(Strict):
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


class SessionsConfig(Strict):
    #: Seconds a session lives after its last activity (a turn admitted or finished).
    ttl_s: float = Field(default=600, gt=0, le=30 * 24 * 3600)
    #: Tasks a session may run; the next one is refused with BUDGET_EXCEEDED.
    max_turns: int = Field(default=8, ge=1, le=1_000_000)
    budgets: Optional[SessionBudgetsConfig] = None


class SupervisionConfig(Strict):
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


class OrchConfig(Strict):
    version: int = 1
    #: Ray namespace of the pool actors; two orchestrators on one cluster need two.
    namespace: str = Field(default="orch", pattern=ID_PATTERN)
    server: ServerConfig = ServerConfig()
    artifacts: ArtifactsConfig = Field(default_factory=ArtifactsConfig)
    supervision: SupervisionConfig = SupervisionConfig()
    catalog: CatalogConfig = Field(default_factory=CatalogConfig)
    sessions: SessionsConfig = SessionsConfig()
    tenants: TenantsConfig = Field(default_factory=TenantsConfig)
    pools: list[PoolConfig] = Field(min_length=1)
    #: Models loaded when a request names them (orch/config/model_set.py); none: pools only.
    model_set: Optional[ModelSetConfig] = None

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
    def _default_tenant_reserve(self) -> "OrchConfig":
        """Unset ``tenant_reserve_slots``: one reserve slot where tenants are declared."""
        reserve = 1 if self.tenants.declared else 0
        object.__setattr__(self, "pools", [
            pool if pool.tenant_reserve_slots is not None else pool.model_copy(update={"tenant_reserve_slots": reserve})
            for pool in self.pools])
        if self.model_set is not None:
            object.__setattr__(self.model_set, "models", [
                model if model.tenant_reserve_slots is not None
                else model.model_copy(update={"tenant_reserve_slots": reserve})
                for model in self.model_set.models])
            self.model_set._consistent()  # the fit check again, the reserve counted
        return self

    @model_validator(mode="after")
    def _default_local_roots(self) -> "OrchConfig":
        """Unset ``catalog.local_roots``: the model cache and the pools' own model directories."""
        if self.catalog.local_roots is None:
            roots = [self.catalog.model_cache]
            for pool in self.pools:
                folder = _local_model_dir(pool.model)
                if folder is not None and folder not in roots:
                    roots.append(folder)
            object.__setattr__(self.catalog, "local_roots", roots)
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


def _local_model_dir(model: str) -> Optional[str]:
    """The directory holding a pool's local model (a ``file:`` ref or a plain path), or None."""
    if model.startswith("file:"):
        model = model[len("file:"):]
    elif model.startswith("pkg:") or "://" in model or model.split(":", 1)[0] in ("hf", "s3", "oci"):
        return None
    path = Path(model).expanduser()
    if not path.is_absolute():
        path = project_root() / path
    return os.path.realpath(path.parent)
