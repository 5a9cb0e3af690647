"""Engines hosted by pool actors, built from a pool's config by ``build_engine``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from orch.engines.base import Engine, EngineError, GenerationParams

if TYPE_CHECKING:
    from orch.config import PoolConfig

__all__ = ["Engine", "EngineError", "GenerationParams", "build_engine"]


def build_engine(config: "PoolConfig") -> Engine:
    """The engine a pool config asks for, not yet loaded."""
    engine = config.engine.value
    if engine == "llamacpp":
        from orch.config import project_root
        from orch.core.model_ref import resolve_local
        from orch.engines.llamacpp import LlamaCppEngine

        path = resolve_local(config.model, base_dir=project_root())
        threads = config.threads or max(1, int(config.num_cpus))
        return LlamaCppEngine(path, slots=config.slots, ctx=config.ctx, threads=threads, **config.engine_options)
    if engine == "mock":
        from orch.engines.mock import MockEngine

        return MockEngine.from_options(dict(config.engine_options), slots=config.slots, ctx=config.ctx)
    raise EngineError(f"engine '{engine}' cannot host a pool")
