"""Engines hosted by pool actors, built from a pool's config by ``build_engine``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from orch.api.pools import CatalogBinding
from orch.config import PoolConfig, project_root
from orch.core.model_ref import resolve_local, resolve_local_path
from orch.engines.base import Engine, EngineError, GenerationParams
from orch.engines.external import ExternalEngine
from orch.engines.llamacpp_batch import llamacpp_engine
from orch.engines.mock import MockEngine
from orch.engines.vllm_engine import VllmEngine

__all__ = ["Engine", "EngineError", "GenerationParams", "build_engine", "bound_model_path"]


def bound_model_path(config: PoolConfig, binding: Optional[CatalogBinding], *, directory_ok: bool) -> Optional[Path]:
    """The model file a catalog binding names (a record's ``local_path`` or a handoff's
    ``model_path``), checked on this node; None when the pool resolves its own ref."""
    if binding is None or not binding.model_path:
        return None
    path = Path(binding.model_path)
    if path.is_file() or (directory_ok and path.is_dir()):
        return path
    source = f"catalog model '{binding.model_id}'" if binding.model_id else "the handed-off model"
    raise EngineError(f"{source} ({binding.model_ref}) is at {path}, which is not on this node's disk; "
                      "provision it on this node (node_id) or hand off a path that exists here")


def _refuse_external(config: PoolConfig, binding: Optional[CatalogBinding]) -> None:
    if binding is not None and (binding.engine_url or binding.engine_binary):
        where = binding.engine_url or binding.engine_binary
        raise EngineError(f"pool '{config.id}' runs {config.engine.value} inside its actor; the handed-off engine "
                          f"at {where} (handoff '{binding.handoff_id}') runs outside it and is not used by "
                          "this engine; hand it off to a pool whose engine attaches to it")


def granted_cpus() -> Optional[float]:
    """The CPUs Ray granted the calling actor (its ``num_cpus``, or its placement group
    bundle's share); None outside a Ray worker. Ray is read only where it is already loaded:
    engines are built in pool actors, and this package stays importable without Ray."""
    ray = sys.modules.get("ray")
    try:
        if ray is None or not ray.is_initialized():
            return None
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # a driver, or a runtime context without resources: no grant to read
        return None
    return float(cpus) if cpus else None


def pool_threads(config: PoolConfig, granted: Optional[float] = None) -> int:
    """An engine's CPU threads: the config's ``threads``, else the CPUs granted (``granted``,
    when known, else the pool's ``num_cpus``), rounded, at least 1."""
    if config.threads:
        return config.threads
    return max(1, round(granted if granted is not None else config.num_cpus))


def llamacpp_threads(config: PoolConfig) -> int:
    """llama.cpp's thread count inside the pool actor, from the CPUs Ray granted it. llama.cpp's
    threads wait for each other at every step, so one more thread than the cores the pool may
    use stalls all of them whenever the serving processes take a core."""
    return pool_threads(config, granted_cpus())


def build_engine(config: PoolConfig, binding: Optional[CatalogBinding] = None) -> Engine:
    """The engine a pool config asks for, not yet loaded; ``binding`` (from the catalog, see
    orch/catalog/binding.py) names the model file to load instead of the configured ref."""
    engine = config.engine.value
    if engine == "llamacpp":
        _refuse_external(config, binding)
        path = bound_model_path(config, binding, directory_ok=False) or resolve_local(config.model, base_dir=project_root())
        return llamacpp_engine(path, slots=config.engine_slots, ctx=config.ctx, threads=llamacpp_threads(config),
                               **config.engine_options)
    if engine == "vllm":
        _refuse_external(config, binding)
        path = bound_model_path(config, binding, directory_ok=True) or resolve_local_path(
            config.model, base_dir=project_root())
        return VllmEngine(path, slots=config.engine_slots, ctx=config.ctx, engine_options=config.engine_options)
    if engine == "external":
        options = dict(config.engine_options)
        if binding is not None and binding.engine_url:  # an external engine handed off to this pool
            options["base_url"] = binding.engine_url
            if binding.api_key_env:
                options["api_key_env"] = binding.api_key_env
        return ExternalEngine(config.model, slots=config.engine_slots, ctx=config.ctx, **options)
    if engine == "mock":
        return MockEngine.from_options(dict(config.engine_options), slots=config.engine_slots, ctx=config.ctx)
    raise EngineError(f"engine '{engine}' cannot host a pool")
