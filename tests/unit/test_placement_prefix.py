"""Prefix-aware placement: block hashes, the pool's bounded report, and the ranking."""

from __future__ import annotations

import asyncio
import random

from orch.api.pools import PoolView, TaskContext
from orch.api.tasks import PlacementMode, PlacementOverrides, TaskRequest
from orch.config import PoolConfig
from orch.core.placement import REASONS, Prompt, place
from orch.core.prefix import BLOCK_BYTES, MAX_REPORTED, PrefixCache, block_hashes, pack, salt_for, unpack
from orch.engines.base import GenerationParams
from orch.engines.mock import MockEngine
from orch.observability.ingress_metrics import IngressCounters
from orch.pools.manager import PoolManager

SALT = salt_for("test")
SYSTEM = "You are a careful assistant. " * 40  # ~1.2 kB: about 18 blocks


def pool(pool_id: str, cached: tuple[str, ...] = (), **kw) -> PoolView:
    cache = PrefixCache(8)
    for text in cached:
        cache.record(block_hashes(text, SALT))
    kw.setdefault("slots", 4)
    kw.setdefault("service_ms", 1000.0)
    kw.setdefault("prefill_ms_per_token", 1.0)
    kw.setdefault("bytes_per_token", 4.0)
    return PoolView(pool_id=pool_id, engine="mock", model_ref="m", ready=True, prefix_hashes=cache.report(), **kw)


def prompt(text: str, **kw) -> Prompt:
    return Prompt(block_hashes(text, SALT), **kw)


# -- hashes -------------------------------------------------------------------------------
def test_chained_hashes_share_exactly_the_shared_full_blocks():
    a = block_hashes(SYSTEM + "question one" * 10, SALT)
    b = block_hashes(SYSTEM + "another question" * 10, SALT)
    shared = len(SYSTEM) // BLOCK_BYTES
    assert a[:shared] == b[:shared] and a[shared:shared + 1] != b[shared:shared + 1]
    assert block_hashes("x" * (BLOCK_BYTES - 1), SALT) == ()  # less than one block: nothing to match
    assert block_hashes(SYSTEM, salt_for("other cluster"))[0] != a[0]
    assert unpack(pack(a)) == frozenset(a)


def test_the_report_stays_bounded_under_ten_thousand_distinct_prompts():
    cache = PrefixCache(entries=64)
    rng = random.Random(7)
    for n in range(10_000):
        text = f"{n:05d} " * rng.randrange(10, 700)
        cache.admit(block_hashes(text, SALT), len(text), len(text) // 4)
    assert len(cache) == 64
    assert len(cache.report()) <= 8 * MAX_REPORTED
    newest = block_hashes(text, SALT)
    assert cache.match(newest) == len(newest)  # the newest prompt is still reported whole


def test_the_cache_forgets_its_oldest_prompt_beyond_its_entries():
    cache = PrefixCache(entries=2)
    chains = [block_hashes(f"{i} " + SYSTEM, SALT) for i in range(3)]
    for chain in chains:
        cache.record(chain)
    assert cache.match(chains[0]) == 0 and cache.match(chains[2]) == len(chains[2])
    assert PrefixCache(entries=0).report() == b""


# -- ranking ------------------------------------------------------------------------------
def test_the_pool_with_the_longest_cached_prefix_wins():
    question = SYSTEM + "What is the capital of France?"
    pools = [pool("a"), pool("b", cached=(SYSTEM[:300],)), pool("c", cached=(SYSTEM + "What is",))]
    decision = place(pools, prompt=prompt(question))
    assert decision.pool_id == "c" and decision.reason == "prefix_overlap"
    assert decision.overlap_tokens >= len(SYSTEM) // 4 - BLOCK_BYTES
    assert [a.pool_id for a in decision.alternatives] == ["c", "b", "a"]
    assert decision.explain()["alternatives"][0]["overlap_tokens"] == decision.overlap_tokens


def test_without_shared_prefixes_the_choice_is_least_loaded():
    pools = [pool("a", cached=("z" * 2000,), active_slots=2), pool("b", active_slots=1)]
    decision = place(pools, prompt=prompt(SYSTEM))
    assert decision.pool_id == "b" and decision.reason == "least_loaded"
    assert place(pools).pool_id == "b"


def test_load_overrides_affinity_when_the_warm_pool_is_saturated():
    warm = dict(cached=(SYSTEM,), slots=2, active_slots=2, service_ms=2000.0)
    busy = [pool("warm", queue_depth=3, **warm), pool("cold", active_slots=1)]
    decision = place(busy, prompt=prompt(SYSTEM + "hi"))
    assert decision.pool_id == "cold" and decision.reason == "least_loaded"
    # A short wait is worth it when the prefill it saves is longer.
    slow_prefill = [pool("warm", queue_depth=0, prefill_ms_per_token=20.0, **warm), pool("cold", active_slots=1)]
    assert place(slow_prefill, prompt=prompt(SYSTEM + "hi")).pool_id == "warm"


def test_a_pool_at_capacity_loses_affinity_to_one_that_can_start_at_once():
    # Saves 2 ms x ~300 tokens = ~600 ms against a 1,000 ms wait (2,000 ms service over 2 slots):
    # the question starts at once on the cold pool, and the warm pool's score is its bare wait.
    warm = pool("warm", cached=(SYSTEM,), slots=2, active_slots=2, service_ms=2000.0, prefill_ms_per_token=2.0)
    decision = place([warm, pool("cold", active_slots=3)], prompt=prompt(SYSTEM + "hi"))
    assert decision.pool_id == "cold" and decision.reason == "least_loaded"
    lost = {a.pool_id: a for a in decision.alternatives}["warm"]
    assert lost.expected_wait_ms == 1000.0 and lost.score_ms == 1000.0
    # With room, running sequences cost no wait: affinity holds however busy the warm pool is.
    roomy = place([pool("warm", cached=(SYSTEM,), active_slots=3), pool("cold")], prompt=prompt(SYSTEM + "hi"))
    assert roomy.pool_id == "warm" and roomy.reason == "prefix_overlap"
    # When no pool can start at once, the saving still counts against the queue it joins.
    full = [pool("warm", cached=(SYSTEM,), slots=2, active_slots=2, prefill_ms_per_token=5.0),
            pool("cold", slots=2, active_slots=2)]
    assert place(full, prompt=prompt(SYSTEM + "hi")).pool_id == "warm"


def test_with_nothing_cached_busy_pools_keep_least_loadeds_order():
    pools = [pool("a", slots=1, active_slots=1, queue_depth=1, service_ms=1000.0),
             pool("b", slots=4, active_slots=4, queue_depth=2, service_ms=1000.0)]
    assert place(pools, prompt=prompt(SYSTEM)).pool_id == place(pools, prompt=prompt(SYSTEM, policy="least_loaded"))\
        .pool_id == "b"


def test_prefill_speed_is_measured_only_from_mostly_uncached_prompts():
    cache = PrefixCache(8)
    cache.prefilled(300.0, 20)  # a cached system prompt plus a short question: the first decode step
    assert cache.prefill_ms_per_token == 0.0
    cache.prefilled(400.0, 400)
    assert cache.prefill_ms_per_token == 1.0


def test_decisions_are_deterministic_whatever_the_order_of_the_pools():
    pools = [pool(p, cached=(SYSTEM[:i * 200],), active_slots=i % 3) for i, p in enumerate("abcdef")]
    wanted = prompt(SYSTEM + "q")
    first = place(pools, prompt=wanted)
    for seed in range(20):
        shuffled = random.Random(seed).sample(pools, len(pools))
        again = place(shuffled, prompt=wanted)
        assert again == first and again.alternatives == first.alternatives
    twins = [pool("b", cached=(SYSTEM,)), pool("a", cached=(SYSTEM,))]
    assert place(twins, prompt=wanted).pool_id == "a"  # equal scores: the id decides


def test_pins_avoid_lists_and_masks_win_over_overlap():
    pools = [pool("warm", cached=(SYSTEM,), device_mask="0"), pool("cold", device_mask="1")]
    wanted = prompt(SYSTEM + "q")
    pinned = place(pools, prompt=wanted, overrides=PlacementOverrides(mode=PlacementMode.pin, pin_pool_id="cold"))
    assert pinned.pool_id == "cold" and pinned.reason == "pinned"
    assert place(pools, prompt=wanted, overrides=PlacementOverrides(avoid_pools=["warm"])).pool_id == "cold"
    assert place(pools, prompt=wanted, overrides=PlacementOverrides(require_device_mask="1")).pool_id == "cold"
    preferred = place(pools, prompt=wanted, overrides=PlacementOverrides(prefer_pools=["cold"]))
    assert preferred.pool_id == "cold" and preferred.reason == "preferred"


def test_baseline_policies_ignore_the_prefix():
    pools = [pool("a"), pool("b", cached=(SYSTEM,)), pool("c")]
    wanted = SYSTEM + "q"
    assert place(pools, prompt=prompt(wanted, policy="least_loaded")).pool_id == "a"
    turns = [place(pools, prompt=prompt(wanted, policy="round_robin", turn=t)).pool_id for t in range(4)]
    assert turns == ["a", "b", "c", "a"]


def test_decisions_are_counted_by_a_bounded_reason():
    counters = IngressCounters()
    counters.placed(place([pool("a"), pool("b", cached=(SYSTEM,))], prompt=prompt(SYSTEM + "q")))
    counters.refused("POOL_UNREADY", pinned=False)
    keys = [tuple(k) for k, _ in counters.take_deltas()["decisions"]]
    assert ("placed", "false", "false", "prefix_overlap") in keys and all(
        k[3] in REASONS + ("refused",) for k in keys)


# -- the engine and the pool ----------------------------------------------------------------
def test_the_mock_engine_reads_only_the_uncached_part_of_a_prompt():
    engine = MockEngine(slots=2)
    engine.load()
    params = GenerationParams(max_tokens=3, seed=1)
    engine.generate(0, SYSTEM + "first", params, lambda piece: True)
    read = engine.stats["prompt_evaluated"]
    engine.generate(0, SYSTEM + "second question", params, lambda piece: True)
    assert engine.stats["prompt_reused"] == len(SYSTEM.split())
    assert engine.stats["prompt_evaluated"] - read == 3  # "second", "question" and the first token


def test_a_pool_reports_what_it_admitted_and_a_restart_clears_it():
    config = PoolConfig.model_validate(dict(id="p", engine="mock", model="mock-model", num_gpus=0, allow_cpu=True,
                                            slots=2, engine_options={"tokens_per_s": 0}))
    chain = block_hashes(SYSTEM, SALT)

    async def scenario():
        manager = PoolManager(config)
        await manager.start()
        request = TaskRequest.model_validate({"prompt": SYSTEM, "max_tokens": 2})
        await manager.submit(request, "t1", None, TaskContext(prefix_chain=chain))
        second = await manager.submit(request, "t2", None, TaskContext(prefix_chain=chain))
        held = manager.snapshot().prefix_hashes
        warm = manager.core.tasks["t2"].context.kv_warmth
        await manager.stop()
        restarted = PoolManager(config)
        await restarted.start()
        after = restarted.snapshot().prefix_hashes
        await restarted.stop()
        return held, warm, second, after, manager.core.prefix

    held, warm, second, after, cache = asyncio.run(scenario())
    assert second.admission is not None and warm is True
    assert unpack(held) == frozenset(chain) and after == b""
    assert cache.hit_tokens > 0 and cache.miss_tokens > 0


def test_the_ingress_counts_its_own_placements_and_their_ends_between_refreshes():
    from orch.config import parse_config
    from orch.serve.registry import PoolRegistry

    config = parse_config({"version": 1, "pools": [dict(id="a", engine="mock", model="m", num_gpus=0,
                                                        allow_cpu=True)]}, "t")
    registry = PoolRegistry(config, {}, ttl_s=1.0, nudge_supervisor=False)
    registry._set_rows({"a": pool("a", slots=2)})
    chain = block_hashes(SYSTEM, SALT)
    registry.note_admitted("a", pack(chain), "t1")
    row = registry._rows["a"]
    assert row.load == 1 and place([row], prompt=Prompt(chain)).reason == "prefix_overlap"
    registry.note_finished("t1", "a")
    registry.note_finished("t1", "a")  # a second stream of the same task changes nothing
    assert registry._rows["a"].load == 0 and registry._rows["a"].prefix_hashes
