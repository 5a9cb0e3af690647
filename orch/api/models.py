"""Models on demand as the API shows them: every model of the configured set, loaded or
not, where it runs, since when, when it was last used, and the memory budgets they share."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, Field


class ModelStatus(BaseModel):
    id: str
    ref: str
    engine: str
    #: The pool the model loads in (named after the model).
    pool_id: str
    #: ``unloaded``, ``loading`` or ``loaded``.
    state: str
    loaded: bool
    pinned: bool
    #: Seconds an idle model stays loaded (0: unloaded when idle, -1: never).
    keep_alive: float
    #: Estimated bytes when loaded (weights + KV); None: unknown until it is fetched.
    size_bytes: Optional[int] = None
    #: The budget it is loaded into.
    budget: Optional[str] = None
    node_id: Optional[str] = None
    #: GPU ids of its pool (None on CPU).
    gpus: Optional[str] = None
    #: Unix times.
    since: Optional[float] = None
    last_used: Optional[float] = None
    #: Queued or running work (a busy model is never evicted).
    busy: bool = False
    last_error: Optional[str] = None


class BudgetStatus(BaseModel):
    id: str
    #: None: unknown (no declared size and nothing measurable).
    budget_bytes: Optional[int] = None
    used_bytes: int = 0


class ModelSetStatus(BaseModel):
    """``GET /v2/models``."""

    models: list[ModelStatus] = Field(default_factory=list)
    budgets: list[BudgetStatus] = Field(default_factory=list)
