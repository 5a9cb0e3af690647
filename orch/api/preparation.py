"""Preparation contract: what must happen before a pool can serve a model it does not have yet.

A task for such a pool is answered with a ``Preparation``: in the 202 admission when the
orchestrator may fetch the model itself (the task is queued in the waiting pool and starts
once it is Ready), or in the 503 ``POOL_UNREADY`` error when it may not (an operator has to
provision or hand off the model). While the model is prepared, the task's SSE stream carries
``metrics`` frames whose ``prep`` field is the same object with updated steps.
"""

from __future__ import annotations

from enum import Enum
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field


class PrepStep(str, Enum):
    engine_provision = "engine_provision"
    model_fetch = "model_fetch"
    pool_warmup = "pool_warmup"


class PrepStatus(str, Enum):
    pending = "pending"
    running = "running"
    done = "done"
    #: Not needed here (an engine already installed, a model already on disk).
    skipped = "skipped"
    #: Cannot proceed on its own: ``reason`` says why, ``how`` what an operator can do.
    blocked = "blocked"
    failed = "failed"


class PreparationStep(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=True)

    step: PrepStep
    status: PrepStatus
    pct: float = Field(ge=0, le=100, description="progress of this step, 0-100")
    detail: Optional[str] = Field(default=None, description="bytes done, the engine found, why it failed")


class Preparation(BaseModel):
    """The steps between a pool waiting for its model and a pool serving it, in order."""

    model_config = ConfigDict(extra="forbid")

    pool_id: str
    model_ref: str = Field(description="the model ref the pool waits for (catalog form)")
    fetch_allowed: bool = Field(description="the orchestrator may fetch the model itself (outbound policy and "
                                            "catalog.fetch_on_demand)")
    steps: list[PreparationStep]
    reason: Optional[str] = Field(default=None, description="why preparation cannot proceed on its own")
    how: Optional[str] = Field(default=None, description="what an operator can do to provide the model")


__all__ = ["Preparation", "PreparationStep", "PrepStatus", "PrepStep"]
