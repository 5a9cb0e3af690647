"""Placement: choose one pool for a task from a snapshot of the pools.

Only Ready pools that are not draining and that serve the asked engine and model are
candidates. A pin never falls back. Preferred pools win when one is eligible; avoided pools
are never chosen. Among candidates that can start the task now the order is: most free
VRAM, then least work (active slots plus queued tasks), then pool id; when all are busy,
the shortest expected wait (queue x measured task time) wins, so the same snapshot always gives the same answer. A session stays on the pool
that served its last turn while that pool is a candidate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from orch.api.errors import ErrorCode
from orch.api.tasks import PlacementMode, PlacementOverrides
from orch.core.errors import OrchError


@dataclass(frozen=True)
class PoolView:
    """What placement needs to know about one pool (a row of the registry snapshot)."""

    pool_id: str
    engine: str
    model_ref: str
    ready: bool
    draining: bool = False
    model_aliases: tuple[str, ...] = ()
    vram_free_bytes: int = 0
    vram_total_bytes: int = 0
    slots: int = 1
    active_slots: int = 0
    queue_depth: int = 0
    device_mask: Optional[str] = None
    workloads: tuple[str, ...] = ("completion",)
    #: Replica set this pool belongs to (its own id when it is alone).
    replica_set: Optional[str] = None
    engine_version: str = ""
    #: Moving average of one task's run time on this pool (ms); 0 when unknown.
    service_ms: float = 0.0

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

    @property
    def accepting(self) -> bool:
        return self.ready and not self.draining


@dataclass(frozen=True)
class PlacementDecision:
    pool_id: str
    pinned: bool = False
    fallback: bool = False
    session_affinity: bool = False
    candidates_considered: int = 0


def rank_key(pool: PoolView) -> tuple[int, float, int, str]:
    """Pools that can start the task now come first, ordered by most free VRAM, then least
    work (slots in use plus queued tasks), then id. When every candidate is busy, the one
    with the shortest expected wait (its queue times its measured task time per slot) wins.

    Free VRAM alone would send every task to the biggest card whatever its speed or queue;
    it decides among pools with room, and expected wait decides among full ones.
    """
    if pool.can_start_now:
        return (0, float(-pool.vram_free_bytes), pool.load, pool.pool_id)
    return (1, pool.expected_wait_ms, pool.load, pool.pool_id)


def best(pools: Iterable[PoolView]) -> PoolView:
    return min(pools, key=rank_key)


def place(
    pools: Sequence[PoolView],
    *,
    engine: Optional[str] = None,
    model_ref: Optional[str] = None,
    overrides: Optional[PlacementOverrides] = None,
    session_pool_id: Optional[str] = None,
    workload: str = "completion",
) -> PlacementDecision:
    overrides = overrides or PlacementOverrides()
    wanted = _describe(engine, model_ref, workload)
    serving = [p for p in pools if p.serves(engine, model_ref, workload)]

    if overrides.mode == PlacementMode.pin:
        return _place_pinned(pools, overrides, engine, model_ref, workload)

    if not serving:
        known = ", ".join(sorted(p.pool_id for p in pools)) or "none"
        raise OrchError(
            ErrorCode.POOL_UNAVAILABLE,
            f"no pool serves {wanted}; configured pools: {known}",
            engine=engine,
        )
    avoid = set(overrides.avoid_pools)
    mixed = _mixed_version_members(serving)
    candidates = [
        p
        for p in serving
        if p.accepting
        and not p.named(avoid)
        and p.pool_id not in mixed
        and (overrides.require_device_mask is None or p.device_mask == overrides.require_device_mask)
    ]
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
                return PlacementDecision(pool.pool_id, session_affinity=True, candidates_considered=considered)

    if overrides.prefer_pools:
        preferred = [p for p in candidates if p.named(overrides.prefer_pools)]
        if preferred:
            return PlacementDecision(best(preferred).pool_id, candidates_considered=considered)
        if not overrides.allow_fallback:
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
            raise OrchError(
                ErrorCode.POOL_UNREADY,
                "none of the preferred pools ("
                + ", ".join(overrides.prefer_pools)
                + ") is Ready and allow_fallback is false",
                retriable=True,
                retry_after_ms=1000,
                engine=engine,
            )
        return PlacementDecision(best(candidates).pool_id, fallback=True, candidates_considered=considered)

    return PlacementDecision(best(candidates).pool_id, candidates_considered=considered)


def _place_pinned(
    pools: Sequence[PoolView],
    overrides: PlacementOverrides,
    engine: Optional[str],
    model_ref: Optional[str],
    workload: str = "completion",
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
    accepting = [
        p for p in members
        if p.accepting and p.pool_id not in mixed
        and (overrides.require_device_mask is None or p.device_mask == overrides.require_device_mask)
    ]
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
    return PlacementDecision(best(accepting).pool_id, pinned=True, candidates_considered=len(accepting))


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
