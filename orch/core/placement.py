"""Placement: choose one pool for a task from a snapshot of the pools.

Only Ready pools that are not draining and that serve the asked engine and model are
candidates. A pin never falls back. Preferred pools win when one is eligible; avoided pools
are never chosen. Among candidates that can start the task now the order is: most free
VRAM, then least work (active slots plus queued tasks), then pool id; when all are busy,
the shortest expected wait (queue x measured task time) wins, so the same snapshot always gives the same answer. A session stays on the pool
that served its last turn while that pool is a candidate.

Prefix-aware (``policy="prefix"``, the default): a request's prompt comes with its chained
block hashes (orch/core/prefix.py) and each candidate's score is its expected wait (the
sequences it carries beyond its slots, at its measured service time per slot) minus the
prefill its cached prefix would save (overlap tokens x the pool's measured prefill time per
token); a pool at capacity keeps no affinity when another pool can start at once and the
prefill saved is smaller. The lowest score wins; equal scores fall to the order above, so
with no shared prefix the choice is exactly least-loaded's. Pins, avoid lists, device masks and preferred
pools narrow the candidates first: overlap only ranks what they allow. Each decision says
why (``reason``, one of ``REASONS``) with every candidate's score.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Optional, Sequence

from orch.api.errors import ErrorCode
from orch.api.pools import PoolView
from orch.api.tasks import PlacementMode, PlacementOverrides
from orch.core.errors import OrchError
from orch.core.model_ref import display_name
from orch.core.prefix import BLOCK_BYTES, overlap_blocks, unpack

__all__ = ["PlacementDecision", "PoolView", "POLICIES", "REASONS", "Scored", "best", "place", "preparing_pool",
           "rank_key"]

#: Placement policies (``server.placement``): prefix-aware, today's least-loaded order, or
#: round-robin over the candidates by id (a benchmark baseline).
POLICIES = ("prefix", "least_loaded", "round_robin")
#: Why a pool was chosen: the bounded values of ``placement_decisions_total{reason}``.
REASONS = ("pinned", "session_affinity", "preferred", "fallback", "prefix_overlap", "least_loaded", "round_robin")
#: Overlaps shorter than this many blocks are ignored: a chat template's first line is in
#: every warm pool's cache and would only pull work toward whichever pool ran anything.
MIN_OVERLAP_BLOCKS = 2
#: Bytes per token and prefill milliseconds per token assumed for a pool that has not
#: measured its own yet.
DEFAULT_BYTES_PER_TOKEN = 4.0
DEFAULT_PREFILL_MS_PER_TOKEN = 0.5
#: Alternatives recorded with a decision, at most.
MAX_ALTERNATIVES = 8


@dataclass(frozen=True)
class Scored:
    """One candidate's score: expected wait minus the prefill its cache saves (ms)."""

    pool_id: str
    score_ms: float
    overlap_tokens: int
    expected_wait_ms: float

    def to_dict(self) -> dict[str, Any]:
        return {"pool_id": self.pool_id, "score_ms": self.score_ms, "overlap_tokens": self.overlap_tokens,
                "expected_wait_ms": self.expected_wait_ms}


@dataclass(frozen=True)
class PlacementDecision:
    pool_id: str
    pinned: bool = False
    fallback: bool = False
    session_affinity: bool = False
    candidates_considered: int = 0
    #: One of ``REASONS``.
    reason: str = "least_loaded"
    #: Prompt tokens the chosen pool probably holds (estimated from the shared bytes).
    overlap_tokens: int = 0
    #: The candidates' scores, best first (at most ``MAX_ALTERNATIVES``; empty when no
    #: ranking was needed: pinned to one pool, session affinity).
    alternatives: tuple[Scored, ...] = field(default=(), compare=False)

    def explain(self) -> dict[str, Any]:
        """Why this pool (plain data, for the task's ``started`` event)."""
        return {"reason": self.reason, "overlap_tokens": self.overlap_tokens,
                "alternatives": [a.to_dict() for a in self.alternatives]}


@dataclass(frozen=True)
class Prompt:
    """What placement knows of a prompt: its chained block hashes (orch/core/prefix.py)."""

    chain: tuple[int, ...] = ()
    #: Placement policy (one of ``POLICIES``) and the ingress's decision counter (round-robin).
    policy: str = "prefix"
    turn: int = 0


def rank_key(pool: PoolView, by_vram: bool = True) -> tuple[int, float, int, str]:
    """Pools that can start the task now come first, ordered by most free VRAM, then least
    work (slots in use plus queued tasks), then id. When every candidate is busy, the one
    with the shortest expected wait (its queue times its measured task time per slot) wins.

    Free VRAM alone would send every task to the biggest card whatever its speed or queue;
    it decides among pools with room, and expected wait decides among full ones.
    ``by_vram`` false (some pool's VRAM is unknown) leaves VRAM out of the order.
    """
    if pool.can_start_now:
        free = pool.vram_free_bytes if by_vram and pool.vram_free_bytes is not None else 0
        return (0, float(-free), pool.load, pool.pool_id)
    return (1, pool.expected_wait_ms, pool.load, pool.pool_id)


def best(pools: Iterable[PoolView]) -> PoolView:
    """The first pool in ``rank_key`` order. Free VRAM only ranks pools when every pool that
    could start the task now reported it: an unknown amount (a failed probe) is neither
    more nor less than a known one, so then load and id decide."""
    pools = list(pools)
    by_vram = all(p.vram_free_bytes is not None for p in pools if p.can_start_now)
    return min(pools, key=lambda p: rank_key(p, by_vram))


@lru_cache(maxsize=256)
def _held(report: bytes) -> frozenset[int]:
    return unpack(report)


def score(pool: PoolView, prompt: Prompt, start_elsewhere: bool = False) -> Scored:
    """``pool``'s expected wait minus the prefill its cached prefix of ``prompt`` saves. A pool at
    capacity keeps no affinity when another candidate can start at once and the prefill saved
    is smaller than the wait (``start_elsewhere``)."""
    blocks = overlap_blocks(prompt.chain, _held(pool.prefix_hashes)) if pool.prefix_hashes and prompt.chain else 0
    tokens = int(blocks * BLOCK_BYTES / (pool.bytes_per_token or DEFAULT_BYTES_PER_TOKEN))
    saved = 0.0
    if prompt.policy == "prefix" and blocks >= MIN_OVERLAP_BLOCKS:
        saved = tokens * (pool.prefill_ms_per_token or DEFAULT_PREFILL_MS_PER_TOKEN)
    wait = pool.expected_wait_ms
    if start_elsewhere and not pool.can_start_now and saved < wait:
        saved = 0.0
    return Scored(pool.pool_id, round(wait - saved, 3), tokens, round(wait, 3))


def choose(pools: Sequence[PoolView], prompt: Prompt) -> tuple[PoolView, str, int, tuple[Scored, ...]]:
    """The best of ``pools`` for ``prompt``: (pool, reason, overlap tokens, scores best first)."""
    by_vram = all(p.vram_free_bytes is not None for p in pools if p.can_start_now)
    free = any(p.can_start_now for p in pools)
    scored = {p.pool_id: score(p, prompt, free) for p in pools}
    if prompt.policy == "round_robin":
        ordered = sorted(pools, key=lambda p: p.pool_id)
        chosen = ordered[prompt.turn % len(ordered)]
        ranked = [chosen] + [p for p in ordered if p is not chosen]
        reason = "round_robin"
    else:
        ranked = sorted(pools, key=lambda p: (scored[p.pool_id].score_ms, rank_key(p, by_vram)))
        chosen = ranked[0]
        saved = scored[chosen.pool_id].expected_wait_ms - scored[chosen.pool_id].score_ms
        reason = "prefix_overlap" if saved > 0 else "least_loaded"
    alternatives = tuple(scored[p.pool_id] for p in ranked[:MAX_ALTERNATIVES])
    return chosen, reason, scored[chosen.pool_id].overlap_tokens, alternatives


def place(
    pools: Sequence[PoolView],
    *,
    engine: Optional[str] = None,
    model_ref: Optional[str] = None,
    overrides: Optional[PlacementOverrides] = None,
    session_pool_id: Optional[str] = None,
    workload: str = "completion",
    prompt: Optional[Prompt] = None,
) -> PlacementDecision:
    overrides = overrides or PlacementOverrides()
    prompt = prompt or Prompt()
    wanted = _describe(engine, model_ref, workload)
    serving = [p for p in pools if p.serves(engine, model_ref, workload)]

    if overrides.mode == PlacementMode.pin:
        return _place_pinned(pools, overrides, engine, model_ref, workload, prompt)

    if not serving:
        known = ", ".join(sorted(p.pool_id for p in pools)) or "none"
        raise OrchError(
            ErrorCode.POOL_UNAVAILABLE,
            f"no pool serves {wanted}; configured pools: {known}",
            engine=engine,
        )
    avoid = set(overrides.avoid_pools)
    mixed = _mixed_version_members(serving)
    candidates = [p for p in serving if p.accepting and p.pool_id not in mixed and _within(p, overrides)]
    if not candidates:
        reasons = ", ".join(f"{p.pool_id} ({_why_excluded(p, avoid, overrides.require_device_mask, mixed)})"
                            for p in serving)
        raise OrchError(
            ErrorCode.POOL_UNREADY,
            f"no pool can take work for {wanted} now: {reasons}; retry shortly",
            retriable=True,
            retry_after_ms=1000,
            engine=engine,
        )
    considered = len(candidates)

    # Affinity never overrides a hard constraint: with allow_fallback false, only preferred pools.
    if session_pool_id is not None and (
        overrides.allow_fallback or not overrides.prefer_pools or session_pool_id in overrides.prefer_pools
    ):
        for pool in candidates:
            if pool.pool_id == session_pool_id:
                return PlacementDecision(pool.pool_id, session_affinity=True, candidates_considered=considered,
                                         reason="session_affinity", overlap_tokens=score(pool, prompt).overlap_tokens)

    if overrides.prefer_pools:
        return _place_preferred(pools, serving, candidates, overrides, wanted, engine, prompt)

    return _ranked(candidates, prompt, considered)


def _ranked(pools: Sequence[PoolView], prompt: Prompt, considered: int, *, reason: Optional[str] = None,
            **flags: bool) -> PlacementDecision:
    chosen, why, overlap, alternatives = choose(pools, prompt)
    return PlacementDecision(chosen.pool_id, candidates_considered=considered, reason=reason or why,
                             overlap_tokens=overlap, alternatives=alternatives, **flags)


def _place_preferred(pools: Sequence[PoolView], serving: list[PoolView], candidates: list[PoolView],
                     overrides: PlacementOverrides, wanted: str, engine: Optional[str],
                     prompt: Prompt) -> PlacementDecision:
    """A preferred pool that can take the work; else a fallback when allowed, or the reason
    none of the preferred pools will do."""
    considered = len(candidates)
    preferred = [p for p in candidates if p.named(overrides.prefer_pools)]
    if preferred:
        return _ranked(preferred, prompt, considered, reason="preferred")
    if overrides.allow_fallback:
        return _ranked(candidates, prompt, considered, reason="fallback", fallback=True)
    named = ", ".join(overrides.prefer_pools)
    if not any(p.named(overrides.prefer_pools) for p in pools):
        known = ", ".join(sorted(p.pool_id for p in pools)) or "none"
        raise OrchError(ErrorCode.INVALID_PARAMS,
                        f"placement.prefer_pools ({named}) names no configured pool and allow_fallback is "
                        f"false; configured pools: {known}", engine=engine)
    if not any(p.named(overrides.prefer_pools) for p in serving):
        raise OrchError(ErrorCode.POOL_UNAVAILABLE,
                        f"none of the preferred pools ({named}) serves {wanted} and allow_fallback is false",
                        engine=engine)
    raise OrchError(ErrorCode.POOL_UNREADY,
                    f"none of the preferred pools ({named}) is Ready and allow_fallback is false",
                    retriable=True, retry_after_ms=1000, engine=engine)


def preparing_pool(
    pools: Sequence[PoolView],
    *,
    engine: Optional[str] = None,
    model_ref: Optional[str] = None,
    overrides: Optional[PlacementOverrides] = None,
    workload: str = "completion",
) -> Optional[PlacementDecision]:
    """The pool to wait for when ``place`` found none Ready: one that holds for the asked
    model (waiting for it, or retired), or loads it with a plan that queues tasks (a model
    loaded on demand), and that the request's constraints allow; such a pool answers with
    its preparation plan and queues the task while its model is fetched or loaded.
    Among several, the shortest queue, then the id. None when there is no such pool."""
    overrides = overrides or PlacementOverrides()
    pin = overrides.pin_pool_id if overrides.mode == PlacementMode.pin else None
    found = [
        p for p in pools
        if (p.held or p.queues_while_loading) and not p.draining and p.serves(engine, model_ref, workload)
        and _within(p, overrides)
        and (pin is None or p.named([pin]))
        and (not overrides.prefer_pools or overrides.allow_fallback or p.named(overrides.prefer_pools))
    ]
    if not found:
        return None
    chosen = min(found, key=lambda p: (p.queue_depth, p.pool_id))
    return PlacementDecision(chosen.pool_id, pinned=pin is not None, candidates_considered=len(found),
                             reason="pinned" if pin is not None else "least_loaded")


def _within(pool: PoolView, overrides: PlacementOverrides) -> bool:
    """The request's hard constraints besides the pin: not avoided, on the required devices."""
    return not pool.named(overrides.avoid_pools) and (
        overrides.require_device_mask is None or pool.device_mask == overrides.require_device_mask)


def _place_pinned(
    pools: Sequence[PoolView],
    overrides: PlacementOverrides,
    engine: Optional[str],
    model_ref: Optional[str],
    workload: str = "completion",
    prompt: Optional[Prompt] = None,
) -> PlacementDecision:
    """A pin names a pool, or a replica set (then its best member); it never falls back."""
    pin = overrides.pin_pool_id
    members = [p for p in pools if p.pool_id == pin] or [p for p in pools if p.replica_set == pin]
    if not members:
        known = ", ".join(sorted(p.pool_id for p in pools)) or "none"
        raise OrchError(
            ErrorCode.INVALID_PARAMS,
            f"placement.pin_pool_id '{pin}' names no pool; known pools: {known}",
        )
    if any(p.named(overrides.avoid_pools) for p in members):
        raise OrchError(ErrorCode.INVALID_PARAMS, f"pool '{pin}' is both pinned and avoided")
    pool = members[0]
    if not any(p.serves(engine, model_ref, workload) for p in members):
        raise OrchError(
            ErrorCode.INVALID_PARAMS,
            f"pinned pool '{pin}' serves engine {pool.engine} model {pool.model_ref} "
            f"({', '.join(pool.workloads)}), not {_describe(engine, model_ref, workload)}",
            pool_id=pin,
        )
    if overrides.require_device_mask is not None and not any(
        p.device_mask == overrides.require_device_mask for p in members
    ):
        raise OrchError(
            ErrorCode.INVALID_PARAMS,
            f"pinned pool '{pin}' has device mask {pool.device_mask!r}, "
            f"not the required {overrides.require_device_mask!r}",
            pool_id=pin,
        )
    mixed = _mixed_version_members(pools)
    accepting = [p for p in members if p.accepting and p.pool_id not in mixed and _within(p, overrides)]
    if not accepting:
        state = "draining" if all(p.draining for p in members) else "not Ready"
        raise OrchError(
            ErrorCode.POOL_UNREADY,
            f"pinned pool '{pin}' is {state}; a pin never falls back to another pool",
            retriable=True,
            retry_after_ms=1000,
            pool_id=pin,
            engine=pool.engine,
        )
    return _ranked(accepting, prompt or Prompt(), len(accepting), reason="pinned", pinned=True)


def _mixed_version_members(pools: Sequence[PoolView]) -> set[str]:
    """Ready members of a replica set whose engine version differs from the set's own.

    A replica set promises identical output for identical requests, which only holds on
    one engine version: the version most of its Ready members run (ties: the smallest)
    stays, the others take no work until they match.
    """
    by_set: dict[str, list[PoolView]] = {}
    for pool in pools:
        if pool.replica_set and pool.ready and pool.engine_version:
            by_set.setdefault(pool.replica_set, []).append(pool)
    odd: set[str] = set()
    for members in by_set.values():
        versions = {p.engine_version for p in members}
        if len(versions) < 2:
            continue
        counts = {v: sum(1 for p in members if p.engine_version == v) for v in versions}
        kept = min(versions, key=lambda v: (-counts[v], v))
        odd.update(p.pool_id for p in members if p.engine_version != kept)
    return odd


def _why_excluded(pool: PoolView, avoid: set[str], device_mask: Optional[str], mixed: set[str] = frozenset()) -> str:
    if pool.named(avoid):
        return "avoided"
    if pool.pool_id in mixed:
        return f"engine version {pool.engine_version} differs from its replica set's"
    if device_mask is not None and pool.device_mask != device_mask:
        return f"device mask {pool.device_mask!r}"
    if pool.draining:
        return "draining"
    return "not Ready"


def _describe(engine: Optional[str], model_ref: Optional[str], workload: str = "completion") -> str:
    parts = [] if workload == "completion" else [f"{workload}s"]
    if engine is not None:
        parts.append(f"engine '{engine}'")
    if model_ref is not None:
        parts.append(f"model '{model_ref}'")
    if workload != "completion":
        return parts[0] + (" with " + " and ".join(parts[1:]) if len(parts) > 1 else "")
    return " and ".join(parts) or "any model"


@dataclass(frozen=True)
class ModelMatch:
    """Where a request's model name leads."""

    #: What placement matches: the name itself when it is a model ref or an alias, else the
    #: ref of the first pool (by id) whose model has that display name.
    model_ref: str
    #: Ready, not draining pools serving that model for the workload, by id.
    serving: tuple[PoolView, ...]
    #: False when every pool with the model is loaded and none offers the workload (only
    #: a loaded pool knows its workloads, so one still loading leaves it to placement).
    offered: bool


def served_names(pool: PoolView) -> list[str]:
    """The names a pool answers to besides its model ref (what /v1/models lists): its
    aliases, then its model's display name."""
    names = list(pool.model_aliases)
    name = display_name(pool.model_ref)
    if name not in names:
        names.append(name)
    return names


def match_model(pools: Sequence[PoolView], name: str, workload: str = "completion") -> Optional[ModelMatch]:
    """The pools a model name leads to, for ``workload``; None when no pool has a model of
    that ref, alias or display name."""
    ordered = sorted(pools, key=lambda p: p.pool_id)
    matched = [p for p in ordered if name == p.model_ref or name in served_names(p)]
    if not matched:
        return None
    exact = any(name == p.model_ref or name in p.model_aliases for p in matched)
    model_ref = name if exact else matched[0].model_ref
    relevant = [p for p in matched if model_ref == p.model_ref or model_ref in p.model_aliases]
    offers = [p for p in relevant if workload in p.workloads]
    offered = bool(offers) or not all(p.ready for p in relevant)
    return ModelMatch(model_ref, tuple(p for p in offers if p.accepting), offered)
