"""What crosses the Ray boundary between the ingress and a pool, typed once.

Frozen dataclasses, not pydantic: they are built and pickled on every snapshot, admission
and poll, where validation would only cost time (the values come from our own code).

- ``PoolView``: the placement view of a pool, small, fetched by each ingress replica every
  ``snapshot_ttl_s``; ``None`` VRAM means "unknown" (a failed probe), never "none free".
- ``PoolDetail``: what only some answers need (metrics, counters, chat template, binding,
  preparation); fetched on demand, or when ``PoolView.model_version`` moved on.
- ``Admission`` / ``SubmitResult``, ``PollResult``, ``CancelResult``: the pool's answers.
- ``PoolError``: an error envelope that crosses Ray; the ingress raises it as ``OrchError``.
- ``TaskContext``: what the ingress knows of a task's session, for its metrics frames.
- ``CatalogBinding``: what the catalog says a pool loads (see orch/catalog/binding.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Optional

from orch.api.errors import ErrorCode
from orch.api.pool_state import PoolState

#: Binding statuses (see orch/catalog/binding.py).
READY = "ready"
LOCAL = "local"
WAITING = "waiting"
RETIRED = "retired"


@dataclass(frozen=True)
class PoolError:
    """An error envelope from a pool (the fields of ``ErrorEnvelope``), raised by the ingress."""

    code: ErrorCode
    message: str
    retriable: bool = False
    retry_after_ms: Optional[int] = None
    pool_id: Optional[str] = None
    engine: Optional[str] = None
    policy_label: Optional[str] = None
    #: POOL_UNREADY from a pool preparing its model: what would make it present.
    preparation: Optional[dict[str, Any]] = None

    def to_dict(self) -> dict[str, Any]:
        """Envelope fields, without the empty ones (the SSE ``error`` frame's data)."""
        body: dict[str, Any] = {"code": ErrorCode(self.code).value, "message": self.message}
        for key in ("engine", "pool_id", "retriable", "retry_after_ms", "policy_label", "preparation"):
            value = getattr(self, key)
            if value is not None:
                body[key] = value
        return body


@dataclass(frozen=True)
class PoolView:
    """What placement and the ingress's routes need to know about one pool, every refresh."""

    pool_id: str
    engine: str
    model_ref: str
    ready: bool
    draining: bool = False
    model_aliases: tuple[str, ...] = ()
    #: 0 on a pool without GPUs; None: unknown (the probe failed, or the pool did not
    #: answer), which placement never reads as "none free".
    vram_free_bytes: Optional[int] = 0
    vram_total_bytes: Optional[int] = 0
    slots: int = 1
    #: Slots kept for tenants with nothing running (``tenant_reserve_slots``); active_slots
    #: counts the busy ones of both kinds.
    reserve_slots: int = 0
    active_slots: int = 0
    queue_depth: int = 0
    device_mask: Optional[str] = None
    workloads: tuple[str, ...] = ("completion",)
    #: Replica set this pool belongs to (its own id when it is alone).
    replica_set: Optional[str] = None
    engine_version: str = ""
    #: Moving average of one task's run time on this pool (ms); 0 when unknown.
    service_ms: float = 0.0
    #: False for a row the ingress made up because the pool's actor did not answer.
    live: bool = True
    #: The pool's lifecycle state (None on a row made up for a pool that did not answer).
    state: Optional[PoolState] = None
    loading: bool = False
    engine_failed: bool = False
    drained: bool = False
    waiting_for_model: bool = False
    model_retired: bool = False
    #: A first load whose preparation plan queues tasks (a model loaded on demand).
    queues_while_loading: bool = False
    model_id: Optional[str] = None
    model_digest: Optional[str] = None
    queue_capacity: int = 0
    queue_policy: str = ""
    ctx_max: int = 0
    max_tokens_out: Optional[int] = None
    last_error: Optional[str] = None
    #: Ray node of the pool's actor, and the key of the runtime env it was started with.
    node_id: Optional[str] = None
    runtime_env_key: Optional[str] = None
    #: Moves on whenever the model-dependent part of ``PoolDetail`` (chat template, special
    #: tokens) may have changed: the ingress refetches the detail only then.
    model_version: int = 0
    has_chat_template: bool = False
    #: Chained block hashes of the prompts the pool's engine probably holds (orch/core/prefix.py,
    #: packed 8 bytes each, bounded), its measured prefill time per uncached prompt token (ms;
    #: 0 unknown) and prompt bytes per token (0 unknown): prefix-aware placement's input.
    prefix_hashes: bytes = b""
    prefill_ms_per_token: float = 0.0
    bytes_per_token: float = 0.0
    #: Where ``prefix_hashes`` comes from: ``engine`` (what its KV cache holds now),
    #: ``estimate`` (the prompts it admitted last), or "" (nothing reported).
    prefix_source: str = ""

    @property
    def held(self) -> bool:
        """Not Ready because of its model (waiting for it, or retired), not because it fails."""
        return self.waiting_for_model or self.model_retired

    @property
    def load(self) -> int:
        return self.active_slots + self.queue_depth

    @property
    def can_start_now(self) -> bool:
        return self.load < self.slots

    @property
    def expected_wait_ms(self) -> float:
        """How long a newcomer would wait for a slot, from the pool's own measured speed."""
        if self.can_start_now:
            return 0.0
        ahead = self.load - self.slots + 1
        return ahead * max(self.service_ms, 1.0) / max(self.slots, 1)

    @property
    def accepting(self) -> bool:
        return self.ready and not self.draining

    @property
    def vram_used_bytes(self) -> Optional[int]:
        if self.vram_total_bytes is None or self.vram_free_bytes is None:
            return None
        return max(0, self.vram_total_bytes - self.vram_free_bytes)

    def named(self, names: Iterable[str]) -> bool:
        """Is this pool named in ``names``, by its id or its replica set's?"""
        names = set(names)
        return self.pool_id in names or (self.replica_set is not None and self.replica_set in names)

    def serves(self, engine: Optional[str], model_ref: Optional[str], workload: str = "completion") -> bool:
        if workload not in self.workloads:
            return False
        if engine is not None and engine != self.engine:
            return False
        if model_ref is not None and model_ref != self.model_ref and model_ref not in self.model_aliases:
            return False
        return True

    def with_admitted(self) -> "PoolView":
        """This view with one more queued task (the ingress counts its own admissions)."""
        return replace(self, queue_depth=self.queue_depth + 1)


@dataclass(frozen=True)
class PoolDetail:
    """The rest of a pool's state: fetched for /metrics, health, the console, and when the
    view's ``model_version`` changed (chat template, special tokens)."""

    pool_id: str
    model_version: int = 0
    chat_template: Optional[str] = None
    special_tokens: dict[str, Any] = field(default_factory=dict)
    #: The binding the pool runs with (None: started without the catalog's word).
    binding: Optional[CatalogBinding] = None
    preparation: Optional[dict[str, Any]] = None
    queue_depth_by_priority: dict[str, int] = field(default_factory=dict)
    #: ``PoolMetrics.to_dict()``: counters and histograms by name.
    metrics: dict[str, Any] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class PoolSnapshot:
    """A view and its detail together (the supervisor's and the operator routes' read)."""

    view: PoolView
    detail: PoolDetail


@dataclass(frozen=True)
class TaskContext:
    """What the ingress knew at admission, for the task's ``metrics`` frames (ids and numbers)."""

    kv_warmth: bool = False
    #: The prompt's chained block hashes (the pool records them as cached) and why placement
    #: chose this pool (``PlacementDecision.explain()``, shown in the ``started`` event).
    prefix_chain: tuple[int, ...] = ()
    placement: Optional[dict[str, Any]] = None
    #: Budgets left to the session (None without budgets), and prices per 1k tokens.
    budgets: Optional[dict[str, Any]] = None
    prices: Optional[dict[str, float]] = None
    #: Who the task is for and its share of the pool: the queue is fair between tenants by
    #: weight inside each priority (orch/core/queue.py). "default" when keys are not in use.
    tenant: str = "default"
    weight: float = 1.0
    #: The key whose limits hold a reservation for the task (None: not limited); the pool
    #: settles it with the task's real usage when it ends.
    key_id: Optional[str] = None


@dataclass(frozen=True)
class Admission:
    task_id: str
    pool_id: str
    queue_position: int
    predicted_start_ms: int
    backoff_ms: int = 0
    prompt_tokens: int = 0
    seed: Optional[int] = None
    #: Set when the task was queued while the pool prepares its model.
    preparation: Optional[dict[str, Any]] = None


@dataclass(frozen=True)
class SubmitResult:
    """A pool's answer to a submit: exactly one of ``admission`` and ``error``."""

    admission: Optional[Admission] = None
    error: Optional[PoolError] = None


#: One event of a task: (index, kind, data); data is the SSE frame's JSON object.
TaskEvent = tuple[int, str, dict[str, Any]]


@dataclass(frozen=True)
class TaskMarks:
    """A task's times inside its pool (``time.monotonic()`` on the pool's host), sent with
    the page that carries its first token: the ingress splits a request's first-token time
    into queue, engine and orchestrator from them (durations on one clock each)."""

    admitted_at: float
    started_at: Optional[float]
    first_token_at: Optional[float]
    #: When the page carrying the first token left the pool.
    sent_at: float


@dataclass(frozen=True)
class PollResult:
    events: tuple[TaskEvent, ...] = ()
    done: bool = False
    #: The task is not (or no longer) in this pool.
    error: Optional[PoolError] = None
    #: Set on the page that carries the task's first token.
    marks: Optional[TaskMarks] = None


@dataclass(frozen=True)
class CancelResult:
    found: bool
    was_queued: bool = False
    tokens_sent: int = 0
    acknowledged: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"found": self.found, "was_queued": self.was_queued, "tokens_sent": self.tokens_sent,
                "acknowledged": self.acknowledged}


@dataclass(frozen=True)
class CatalogBinding:
    """What the catalog says one pool loads, or why it waits (see orch/catalog/binding.py)."""

    pool_id: str
    model_ref: str
    status: str = LOCAL
    model_path: Optional[str] = None
    model_digest: Optional[str] = None
    model_id: Optional[str] = None
    handoff_id: Optional[str] = None
    engine_url: Optional[str] = None
    engine_binary: Optional[str] = None
    engine_version: Optional[str] = None
    engine_mode: Optional[str] = None
    runtime_env: dict[str, Any] = field(default_factory=dict)
    api_key_env: Optional[str] = None
    note: Optional[str] = None
    #: Equal keys load the same thing, so the pool keeps its engine.
    load_key: str = ""
    #: Set by the pool on the binding it kept when loading this one's ``load_key`` failed.
    failed_key: Optional[str] = None
    runtime_env_key: Optional[str] = None
    #: The preparation plan while the pool waits (None when ready).
    preparation: Optional[dict[str, Any]] = None

    @property
    def held(self) -> bool:
        return self.status in (WAITING, RETIRED)

    def but(self, **changes: Any) -> "CatalogBinding":
        return replace(self, **changes)
