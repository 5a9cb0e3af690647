"""A pool's prefix report from its engine's real cache: the text each llama.cpp sequence id (or
slot) holds, hashed as the ingress hashes prompts, and gone once its cells are overwritten."""

from __future__ import annotations

import asyncio

from orch.core.prefix import (
    BLOCK_BYTES,
    PrefixCache,
    Resident,
    block_hashes,
    chain_of,
    held_text,
    overlap_blocks,
    salt_for,
    token_ends,
    unpack,
)
from orch.engines.base import GenerationParams

SALT = salt_for("test")
LEDGER = ("<|im_start|>system\nYou keep the river town's ledger: every boat that passes, its name, its cargo, "
          "the hour it arrived and the hour it left. Answer from the ledger only, and say so when it does not "
          "know.<|im_end|>\n<|im_start|>user\n")  # ~250 bytes: 3 blocks
FIRST = LEDGER + "Which boat came first this morning, and what was it carrying up the river?<|im_end|>\n" \
                 "<|im_start|>assistant\n"
SECOND = LEDGER + "Which boats carried salt last week, and which of them left before noon?<|im_end|>\n" \
                  "<|im_start|>assistant\n"
UNRELATED = ["Once upon a time, in a kingdom by a cold grey sea, there lived a lighthouse keeper who counted waves.",
             "List the planets of the solar system in order from the sun, with one fact about each of them."]


def shared_blocks(a: str, b: str) -> int:
    return overlap_blocks(block_hashes(a, SALT), frozenset(block_hashes(b, SALT)))


def overlap(cache: PrefixCache, text: str) -> int:
    return overlap_blocks(block_hashes(text, SALT), unpack(cache.report()))


# -- mapping tokens back to text ------------------------------------------------------------------
def test_token_pieces_map_back_to_the_prompts_bytes_and_never_past_a_mismatch():
    prompt = b"Hello world, again"
    assert token_ends(prompt, [b"<s>", b"Hello", b" world", b",", b" again"]) == [0, 5, 11, 12, 18]
    assert token_ends(prompt, [b" Hello", b" world"]) == [5, 11]  # SentencePiece's leading space
    assert token_ends(prompt, [b"Hello", b" there", b" world"]) == [5]
    assert held_text(prompt, [b"Hello", b" world", b",", b" again", b" and", b" again"]) == prompt + b" and again"
    assert held_text(prompt, [b"Hello", b" world"]) == b"Hello world"
    assert held_text(prompt, [b"Bye"]) == b""


def test_a_chain_extended_from_its_start_is_the_chain_hashed_whole():
    data = (LEDGER * 3).encode()
    head = chain_of(data[:200], SALT)
    assert chain_of(data, SALT, start=head) == chain_of(data, SALT) == block_hashes(LEDGER * 3, SALT)


def test_the_report_is_what_the_engine_holds_and_forgets_what_it_dropped():
    state = {"resident": Resident(1, ((0, FIRST.encode()), (1, UNRELATED[0].encode())))}
    cache = PrefixCache(2, salt=SALT)
    cache.reset(2, lambda: state["resident"])
    cache.record(block_hashes(SECOND, SALT))  # an admitted prompt is no guess for an engine that tells
    assert cache.source == "engine" and overlap(cache, FIRST) == len(FIRST.encode()) // BLOCK_BYTES
    assert overlap(cache, SECOND) == shared_blocks(FIRST, SECOND) and len(cache) == 2
    state["resident"] = Resident(2, ((0, SECOND.encode()),))  # id 0 taken by SECOND, id 1 dropped
    assert overlap(cache, FIRST) == shared_blocks(FIRST, SECOND) and overlap(cache, UNRELATED[0]) == 0
    assert cache.match(block_hashes(SECOND, SALT)) == len(SECOND.encode()) // BLOCK_BYTES
    # Without the cluster's salt, or from an engine that cannot tell: the estimate.
    unsalted = PrefixCache(2)
    unsalted.reset(2, lambda: state["resident"])
    silent = PrefixCache(2, salt=SALT)
    silent.reset(2, lambda: None)
    for estimate in (unsalted, silent):
        estimate.record(block_hashes(FIRST, SALT))
        assert estimate.source == "estimate" and overlap(estimate, FIRST) == len(FIRST.encode()) // BLOCK_BYTES


def test_prompts_admitted_but_not_read_in_yet_are_reported_until_the_engine_holds_them():
    state = {"resident": Resident(1, ((0, UNRELATED[0].encode()),))}
    cache = PrefixCache(2, salt=SALT)
    cache.reset(2, lambda: state["resident"])
    assert cache.source == "engine" and overlap(cache, FIRST) == 0
    cache.record(block_hashes(FIRST, SALT))  # queued behind the running sequences
    assert overlap(cache, FIRST) == len(FIRST.encode()) // BLOCK_BYTES
    assert cache.match(block_hashes(SECOND, SALT)) == shared_blocks(FIRST, SECOND)
    state["resident"] = Resident(2, ((0, FIRST.encode()),))  # read in: the engine's report holds it
    assert overlap(cache, FIRST) == len(FIRST.encode()) // BLOCK_BYTES and not cache._pending
    for text in UNRELATED + [SECOND]:  # never read in (cancelled): pushed out by newer ones, 2 at most
        cache.record(block_hashes(text * 2, SALT))
    state["resident"] = Resident(3, ())
    assert overlap(cache, UNRELATED[0] * 2) == 0 and overlap(cache, FIRST) == shared_blocks(FIRST, SECOND)
    assert overlap(cache, SECOND * 2) == len((SECOND * 2).encode()) // BLOCK_BYTES


def test_the_estimate_is_bounded_by_the_tokens_the_kv_cache_holds():
    cache = PrefixCache(64)
    cache.reset(64, capacity_tokens=100)  # ~400 bytes at 4 bytes per token: about 6 blocks
    for text in UNRELATED + [FIRST]:
        cache.record(block_hashes(text * 2, SALT))
    assert len(cache) == 1 and overlap(cache, FIRST * 2) == len((FIRST * 2).encode()) // BLOCK_BYTES
    assert overlap(cache, UNRELATED[0] * 2) == 0


# -- real llama.cpp ----------------------------------------------------------------------------------
def run(engine, prompt: str, slot: int = 0) -> str:
    parts: list[str] = []
    engine.generate(slot, prompt, GenerationParams(max_tokens=4, seed=1, temperature=0.0),
                    lambda item: parts.append(item if isinstance(item, str) else item.text) or True)
    return "".join(parts)


def reported(engine) -> PrefixCache:
    cache = PrefixCache(engine.slots, salt=SALT)
    cache.reset(engine.slots, engine.cache_report)
    return cache


def check_overwritten(engine, cache: PrefixCache, overwrite) -> None:
    """FIRST, then SECOND (same ledger); then unrelated prompts take every cache entry."""
    out = run(engine, FIRST)
    (_, held), = engine.cache_report().texts
    # The prompt, then the output fed back (all but the last token, which ended the sequence).
    assert held.startswith(FIRST.encode()) and (FIRST + out).encode().startswith(held) and len(held) > len(FIRST)
    assert cache.source == "engine" and overlap(cache, FIRST) == len(FIRST.encode()) // BLOCK_BYTES
    assert overlap(cache, SECOND) == shared_blocks(FIRST, SECOND) >= 3
    run(engine, SECOND)
    assert overlap(cache, SECOND) == len(SECOND.encode()) // BLOCK_BYTES
    overwrite()
    assert overlap(cache, FIRST) == overlap(cache, SECOND) == 0
    assert all(overlap(cache, text) == len(text.encode()) // BLOCK_BYTES for text in UNRELATED)


def test_the_batched_engine_reports_the_text_its_sequence_ids_hold():
    from tests.unit.test_llamacpp_batch import load

    engine = load(slots=2, ctx=256)
    try:
        cache = reported(engine)

        async def both() -> None:  # at once: each takes one of the two ids
            params = GenerationParams(max_tokens=4, seed=1, temperature=0.0)
            await asyncio.wait_for(asyncio.gather(*(engine.generate_async(i, text, params, lambda item: True)
                                                    for i, text in enumerate(UNRELATED))), 120)

        check_overwritten(engine, cache, lambda: asyncio.run(both()))
        # A reused id keeps only the shared prefix: SECOND took FIRST's id, so FIRST's own question is gone.
        run(engine, FIRST)
        run(engine, SECOND)
        assert overlap(cache, FIRST) == shared_blocks(FIRST, SECOND) < len(FIRST.encode()) // BLOCK_BYTES
    finally:
        engine.close()
    assert cache.report() == b""


def test_the_unbatched_engine_reports_the_text_its_slots_hold():
    from orch.engines.llamacpp import LlamaCppEngine
    from tests.unit.test_llamacpp_batch import model_path

    engine = LlamaCppEngine(model_path(), slots=2, ctx=256, threads=1)
    engine.load()
    try:
        check_overwritten(engine, reported(engine), lambda: [run(engine, text, i) for i, text in enumerate(UNRELATED)])
    finally:
        engine.close()
    assert engine.cache_report().texts == ()


def test_a_pool_reports_its_engines_cache_and_a_restart_clears_it():
    from orch.pools.manager import PoolManager
    from tests.unit.test_pool_manager import drain, pool_config, request

    config = pool_config(slots=2, ctx=256, threads=1, engine_options={"batching": True})

    async def scenario():
        manager = PoolManager(config)
        manager.core.prefix.salt = SALT
        await manager.start()
        await manager.submit(request(prompt=FIRST, max_tokens=2, temperature=0.0), "t1")
        await drain(manager, "t1")
        view = manager.snapshot()
        await manager.stop()
        restarted = PoolManager(config)
        restarted.core.prefix.salt = SALT
        await restarted.start()
        after = restarted.snapshot()
        await restarted.stop()
        return view, after

    view, after = asyncio.run(scenario())
    assert view.prefix_source == "engine"
    assert overlap_blocks(block_hashes(FIRST, SALT), unpack(view.prefix_hashes)) == len(FIRST.encode()) // BLOCK_BYTES
    assert after.prefix_source == "engine" and after.prefix_hashes == b""


def test_a_vllm_engine_without_its_kv_events_leaves_an_estimate_bounded_by_its_kv_blocks():
    from types import SimpleNamespace

    from orch.core.prefix import entries_for
    from orch.engines.vllm_engine import VllmEngine
    from orch.pools.core import prefix_source

    engine = VllmEngine("/nonexistent", slots=4)
    assert engine.cache_capacity_tokens == 0  # not loaded: unknown
    engine._llm = SimpleNamespace(vllm_config=SimpleNamespace(cache_config=SimpleNamespace(
        num_gpu_blocks=1000, block_size=16)))
    assert engine.cache_capacity_tokens == 16_000 and engine.cache_report() is None
    config = SimpleNamespace(engine_slots=4, engine_options={})
    assert prefix_source(engine, "vllm", config)[0] == entries_for("vllm", 4, {})
    assert prefix_source(engine, "vllm", config)[2] == 16_000
    engine._llm = None


def test_vllms_kv_events_become_the_text_of_the_prefixes_its_cache_holds():
    from types import SimpleNamespace as Event

    from orch.engines.vllm_cache import BlockTree

    words = {n: f"w{n} " for n in range(100)}  # token n is the text "w<n> "
    tree = BlockTree(lambda tokens: "".join(words[t] for t in tokens).encode())
    tree.apply(Event(block_hashes=["a", "b"], parent_block_hash=None, token_ids=[1, 2, 3, 4], block_size=2))
    tree.apply(Event(block_hashes=["c"], parent_block_hash="b", token_ids=[5, 6], block_size=2))
    tree.apply(Event(block_hashes=["d"], parent_block_hash="a", token_ids=[7, 8], block_size=2))
    tree.apply(Event(block_hashes=["x"], parent_block_hash=None, token_ids=[9, 9], block_size=2, medium="CPU"))
    texts = [text for _, text in tree.resident().texts]
    assert texts == [b"w1 w2 w7 w8 ", b"w1 w2 w3 w4 w5 w6 "]  # newest first, each path from its root
    version = tree.resident().version
    tree.apply(Event(block_hashes=["b"]))  # "c" lost its parent: no longer a cached prefix
    assert [text for _, text in tree.resident().texts] == [b"w1 w2 w7 w8 "] and tree.resident().version > version
    tree.apply(Event())  # AllBlocksCleared
    assert tree.resident().texts == () and len(tree) == 0
