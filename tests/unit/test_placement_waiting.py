"""Placement beyond Ready pools: the pool to wait for while a model prepares, and pools whose
free VRAM is unknown."""

from __future__ import annotations

from orch.api.tasks import PlacementMode, PlacementOverrides
from orch.core.placement import PlacementDecision, PoolView, place, preparing_pool

GiB = 1 << 30
REF = "hf:org/repo/model.gguf"


def pool(pool_id: str, **kw) -> PoolView:
    kw.setdefault("engine", "llamacpp")
    kw.setdefault("model_ref", REF)
    kw.setdefault("ready", True)
    return PoolView(pool_id=pool_id, **kw)


def waiting(pool_id: str, **kw) -> PoolView:
    return pool(pool_id, ready=False, waiting_for_model=True, **kw)


# --------------------------------------------------------------------------- unknown VRAM


def test_known_vram_ranks_pools_with_room():
    assert place([pool("a", vram_free_bytes=1), pool("b", vram_free_bytes=9 * GiB)]).pool_id == "b"


def test_unknown_vram_is_not_read_as_none_free():
    # "b" failed its probe: it must not lose to "a" as if it had 0 bytes free; load decides.
    pools = [pool("a", vram_free_bytes=GiB, slots=4, active_slots=2), pool("b", vram_free_bytes=None, slots=4)]
    assert place(pools).pool_id == "b"


def test_unknown_vram_is_not_read_as_plenty_either():
    pools = [pool("a", vram_free_bytes=GiB, slots=4), pool("b", vram_free_bytes=None, slots=4, active_slots=1)]
    assert place(pools).pool_id == "a"


def test_unknown_vram_on_a_busy_pool_leaves_the_vram_order_of_the_others():
    pools = [pool("a", vram_free_bytes=1, slots=2), pool("b", vram_free_bytes=9 * GiB, slots=2),
             pool("c", vram_free_bytes=None, active_slots=1)]
    assert place(pools).pool_id == "b"


def test_view_reports_used_vram_only_when_known():
    assert pool("a", vram_total_bytes=10, vram_free_bytes=4).vram_used_bytes == 6
    assert pool("a", vram_total_bytes=None, vram_free_bytes=None).vram_used_bytes is None


# --------------------------------------------------------------------------- preparing pool


def test_held_is_waiting_or_retired():
    assert waiting("a").held
    assert pool("a", ready=False, model_retired=True).held
    assert not pool("a", ready=False).held


def test_waits_for_the_held_pool_with_the_shortest_queue():
    pools = [waiting("a", queue_depth=3), waiting("b", queue_depth=1), pool("c", ready=False)]
    assert preparing_pool(pools, model_ref=REF) == PlacementDecision("b", candidates_considered=2)


def test_no_held_pool_means_nothing_to_wait_for():
    assert preparing_pool([pool("a", ready=False), waiting("b", draining=True)], model_ref=REF) is None


def test_held_pool_of_another_model_or_engine_or_workload_is_not_waited_for():
    pools = [waiting("a")]
    assert preparing_pool(pools, model_ref="hf:other/x.gguf") is None
    assert preparing_pool(pools, engine="vllm") is None
    assert preparing_pool(pools, workload="embedding") is None
    assert preparing_pool([waiting("a", model_aliases=("alias",))], model_ref="alias").pool_id == "a"


def test_pin_selects_only_the_pinned_pool_or_replica_set():
    pools = [waiting("a"), waiting("b", replica_set="set")]
    pin = PlacementOverrides(mode=PlacementMode.pin, pin_pool_id="set")
    assert preparing_pool(pools, overrides=pin) == PlacementDecision("b", pinned=True, candidates_considered=1, reason="pinned")
    gone = PlacementOverrides(mode=PlacementMode.pin, pin_pool_id="zzz")
    assert preparing_pool(pools, overrides=gone) is None


def test_avoid_and_device_mask_exclude_as_in_place():
    pools = [waiting("a", device_mask="0"), waiting("b", device_mask="1")]
    assert preparing_pool(pools, overrides=PlacementOverrides(avoid_pools=["a"])).pool_id == "b"
    assert preparing_pool(pools, overrides=PlacementOverrides(require_device_mask="0")).pool_id == "a"
    assert preparing_pool(pools, overrides=PlacementOverrides(avoid_pools=["a", "b"])) is None


def test_preferred_pools_without_fallback_are_the_only_ones_waited_for():
    pools = [waiting("a"), waiting("b", queue_depth=5)]
    strict = PlacementOverrides(prefer_pools=["b"], allow_fallback=False)
    assert preparing_pool(pools, overrides=strict).pool_id == "b"
    loose = PlacementOverrides(prefer_pools=["b"], allow_fallback=True)
    assert preparing_pool(pools, overrides=loose).pool_id == "a"
