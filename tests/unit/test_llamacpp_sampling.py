"""The OpenAI parameters on the real llama.cpp engines (SmolLM2 GGUF, in process): logprobs
and prompt logprobs equal a bare llama-cpp-python computation, JSON-schema output validates,
logit_bias, min_tokens and the penalties act, and what an engine cannot do is a typed error."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from orch.api.errors import ErrorCode
from orch.api.events import FinishReason
from orch.engines.base import EngineError, GenerationParams, Piece
from tests.unit.test_llamacpp_batch import CHAT, load, model_path

#: The batched engine's logprobs against the bare engine's with the same attention kernel
#: (flash attention, the batched engine's default; without it logprobs differ by up to ~0.1).
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def engine():
    engine = load(slots=2, ctx=512)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def bare():
    """llama-cpp-python's own engine with logits for every position, the reference."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model_path()), n_ctx=512, n_threads=1, logits_all=True, flash_attn=True,
                          verbose=False)
    yield llm
    llm.close()


def reference_logprobs(bare, tokens: list[int]) -> np.ndarray:
    """log-softmax of the bare engine's logits at each position of ``tokens``."""
    from orch.engines.llamacpp_logits import log_softmax

    bare.reset()
    bare.eval(tokens)
    return log_softmax(np.array(bare.scores[:len(tokens)]))


def run(engine, prompt: str, **params) -> tuple[list[Piece], FinishReason]:
    """Every emitted item as a Piece (a bare str is one token), and the finish reason."""
    items: list[Piece] = []
    params = GenerationParams(**{"max_tokens": 12, "seed": 7, "temperature": 0.0, **params})
    finish = engine.generate(0, prompt, params, lambda item: items.append(
        Piece(item) if isinstance(item, str) else item) or True)
    return items, finish


def output(items: list[Piece]) -> tuple[str, int]:
    out = [p for p in items if not p.prompt]
    return "".join(p.text for p in out), sum(p.tokens for p in out)


def test_logprobs_equal_a_bare_computation_of_the_same_logits(engine, bare):
    prompt = CHAT.format("Name a fruit.")
    items, _ = run(engine, prompt, max_tokens=8, logprobs=3)
    text, count = output(items)
    entries = [e for p in items for e in p.logprobs]
    assert len(entries) == count == 8 and "".join(e.token for e in entries) == text
    prompt_tokens = engine._tokens(prompt)
    out_tokens = [bare.tokenize(bytes(e.bytes), add_bos=False, special=True)[0] for e in entries]
    expected = reference_logprobs(bare, prompt_tokens + out_tokens)[len(prompt_tokens) - 1:-1]
    for entry, token, row in zip(entries, out_tokens, expected):
        assert abs(entry.logprob - row[token]) < TOLERANCE
        assert entry.logprob == max(lp for _, lp in entry.top)  # greedy: the chosen token is the likeliest
        assert len(entry.top) == 3 and [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)
        best = np.sort(row)[::-1][:3]
        assert np.allclose([lp for _, lp in entry.top], best, atol=TOLERANCE)
    items, _ = run(engine, prompt, max_tokens=3, logprobs=0)
    assert all(e.top == () and e.logprob is not None for p in items for e in p.logprobs)


def test_prompt_logprobs_equal_the_bare_engines_with_or_without_output(engine, bare):
    prompt = "The capital of France is Paris. The capital of Italy is"
    items, finish = run(engine, prompt, max_tokens=0, prompt_logprobs=2)
    assert finish == FinishReason.length and len(items) == 1
    piece = items[0]
    tokens = engine._tokens(prompt)
    assert piece.prompt and piece.text == prompt and piece.tokens == len(tokens) == len(piece.logprobs)
    assert piece.logprobs[0].logprob is None and piece.logprobs[0].top == ()
    expected = reference_logprobs(bare, tokens)
    for k in range(1, len(tokens)):
        assert abs(piece.logprobs[k].logprob - expected[k - 1][tokens[k]]) < TOLERANCE
        assert len(piece.logprobs[k].top) == 2
    assert "".join(e.token for e in piece.logprobs) == prompt
    # With output too: the prompt's piece comes first, once; a cached prefix does not shorten it.
    items, _ = run(engine, prompt, max_tokens=2, prompt_logprobs=0)
    assert items[0].prompt and [e.logprob for e in items[0].logprobs] == [e.logprob for e in piece.logprobs]
    assert not any(p.prompt for p in items[1:]) and output(items)[1] == 2


def test_json_schema_output_validates_against_the_schema(engine):
    import jsonschema

    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "color": {"enum": ["red", "green", "blue"]},
            "sizes": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 3},
            "owner": {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120},
                                                        "admin": {"type": "boolean"}},
                      "required": ["age", "admin"]},
        },
        "required": ["name", "color", "sizes", "owner"],
    }
    prompt = CHAT.format("Describe a toy as JSON with its name, color, sizes and owner.")
    for sampling in ({"temperature": 0.0}, {"temperature": 0.8, "seed": 3}):
        items, finish = run(engine, prompt, max_tokens=120, json_schema=json.dumps(schema), **sampling)
        text, _ = output(items)
        assert finish == FinishReason.stop, text
        jsonschema.validate(json.loads(text), schema)


def test_bad_schemas_and_grammars_are_the_clients_error_and_say_why(engine):
    cases = [({"json_schema": "{not json"}, "json_schema is not valid JSON"),
             ({"json_schema": '{"type": "frobnicate"}'}, "json_schema cannot become a llama.cpp grammar"),
             ({"grammar": "root ::= undefined-rule"}, "Undefined rule identifier"),
             ({"grammar": 'root ::= "a', }, "grammar: llama.cpp cannot compile"),
             ({"json_schema": "{}", "grammar": 'root ::= "a"'}, "not both"),
             ({"json_schema": "{}", "min_tokens": 3}, "min_tokens"),
             ({"logit_bias": ((10**6, 5.0),)}, "logit_bias: token id 1000000")]
    for params, message in cases:
        with pytest.raises(EngineError, match=message) as refused:
            run(engine, "Hello", **params)
        assert refused.value.code == ErrorCode.INVALID_PARAMS and not refused.value.fatal
    items, _ = run(engine, "Hello", max_tokens=4, grammar='root ::= "yes" | "no"')
    assert output(items)[0] in ("yes", "no")  # a grammar given directly


def test_logit_bias_bans_and_forces_tokens(engine):
    counting, _ = output(run(engine, "1, 2, 3, 4,", max_tokens=3)[0])
    assert counting == " 5,"
    five = engine._tokens("5")[-1]
    banned, _ = output(run(engine, "1, 2, 3, 4,", max_tokens=3, logit_bias=((five, -100.0),))[0])
    assert "5" not in banned
    forced = engine._tokens(" banana")[-1]
    text, count = output(run(engine, "1, 2, 3, 4,", max_tokens=3, temperature=0.9, logit_bias=((forced, 100.0),))[0])
    assert text == " banana" * 3 and count == 3


def test_min_tokens_holds_off_the_end_and_stop_strings(engine):
    items, finish = run(engine, CHAT.format("Say OK."), max_tokens=40)
    short, short_count = output(items)
    assert finish == FinishReason.stop and short_count < 30  # the model ends its answer itself
    items, finish = run(engine, CHAT.format("Say OK."), max_tokens=40, min_tokens=short_count + 8)
    text, count = output(items)
    assert count >= short_count + 8 and text.startswith(short) and len(text) > len(short)
    # The first "," comes at the third token, before min_tokens: only a later one stops.
    items, finish = run(engine, "1, 2, 3, 4,", max_tokens=20, stop=(",",), min_tokens=5)
    assert finish == FinishReason.stop and output(items) == (" 5, 6", 6)  # the stopping "," counted, not shown


def test_penalties_and_typical_p_change_the_output(engine):
    prompt, base = "1, 2, 3, 4,", {"max_tokens": 24}
    counting, _ = output(run(engine, prompt, **base)[0])
    assert counting == " 5, 6, 7, 8, 9, 10, 11, "  # the repeated ", " is what the penalties act on
    for penalty in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"repetition_penalty": 1.8}):
        assert output(run(engine, prompt, **base, **penalty)[0])[0] != counting, penalty
    sampled = {"max_tokens": 24, "temperature": 1.0, "seed": 5, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    story = CHAT.format("Tell me a story.")
    assert output(run(engine, story, **sampled)[0]) != output(run(engine, story, **sampled, typical_p=0.2)[0])


def test_constrained_and_logprob_sequences_keep_their_text_when_a_neighbour_is_cancelled(engine):
    requests = [(CHAT.format("Describe a cat as JSON."), {"json_schema": '{"type": "object"}', "temperature": 0.8,
                                                          "seed": 3, "max_tokens": 16}),
                ("Once upon a time", {"logprobs": 2, "max_tokens": 10}),
                ("The capital of France is", {"max_tokens": 30, "ignore_eos": True})]
    expected = [run(engine, prompt, **params) for prompt, params in requests[:2]]

    async def scenario():
        async def one(index, prompt, params):
            items: list = []

            def emit(item) -> bool:
                items.append(Piece(item) if isinstance(item, str) else item)
                return index != 2 or len(items) < 3  # the third request cancels after its third piece

            finish = await engine.generate_async(index, prompt, GenerationParams(
                **{"max_tokens": 12, "seed": 7, "temperature": 0.0, **params}), emit)
            return items, finish

        return await asyncio.wait_for(asyncio.gather(*(one(i, p, kw) for i, (p, kw) in enumerate(requests))), 120)

    results = asyncio.run(scenario())
    assert results[2][1] == FinishReason.cancelled
    assert results[:2] == expected


def test_the_unbatched_engine_takes_what_llama_cpp_python_does_and_names_the_rest():
    from orch.engines.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(model_path(), slots=1, ctx=512, threads=1)
    engine.load()
    try:
        for params in ({"logprobs": 1}, {"prompt_logprobs": 0}, {"min_tokens": 2}):
            with pytest.raises(EngineError, match="not supported by llama.cpp \\(batching: false\\)") as refused:
                run(engine, "Hello", **params)
            assert refused.value.code == ErrorCode.INVALID_PARAMS and next(iter(params)) in str(refused.value)
        with pytest.raises(EngineError, match="logit_bias") as refused:
            run(engine, "Hello", logit_bias=((-1, 1.0),))
        with pytest.raises(EngineError, match="Undefined rule"):
            run(engine, "Hello", grammar="root ::= nothing")
        text, _ = output(run(engine, CHAT.format("Give a color as JSON."), max_tokens=10,
                             json_schema='{"enum": ["red", "green"]}')[0])
        assert json.loads(text) in ("red", "green")
        five = engine._contexts[0].tokenize(b"5", add_bos=False)[-1]
        assert "5" not in output(run(engine, "1, 2, 3, 4,", max_tokens=3, logit_bias=((five, -100.0),))[0])[0]
        assert output(run(engine, "1, 2, 3, 4,", max_tokens=0)[0]) == ("", 0)
    finally:
        engine.close()
