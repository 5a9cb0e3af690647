"""The OpenAI surface's depth without Ray: the parameters accepted and refused (each naming its
field), what reaches the task, per-engine refusals, ``n`` choices and logprobs shapes, and the
pool's exact token counting for multi-token pieces and prompt logprobs."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Optional

import pytest

from orch.api.openai import ChatCompletionRequest, CompletionRequest
from orch.api.pools import Admission
from orch.api.tasks import TaskRequest
from orch.core import engine_features
from orch.core.placement import PlacementDecision
from orch.engines.base import TokenLogprob
from orch.pools.task_record import TaskRecord
from orch.pools.worker import logprob_payload
from orch.serve.openai.errors import OpenAIRequestError, validated
from orch.serve.openai.serving import OpenAIServing, Target, task_request
from orch.serve.service import Admitted
from tests.unit.test_openai_serving import STARTED, Registry, Stream, data_lines, drain, end, run, view

CHAT = {"model": "smol", "messages": [{"role": "user", "content": "hi"}]}
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def lp(token: str, logprob: Optional[float], *top: tuple[str, float]) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()),
            "top": [{"token": t, "logprob": v} for t, v in top]}


class Service:
    """Admits task ``tN`` on pool ``a`` and replays ``events[N]`` as its stream."""

    def __init__(self, events: list[list[list]]) -> None:
        self.events = events
        self.tasks: list[TaskRequest] = []
        self.cancelled: list[str] = []

    async def admit(self, task: Any, correlation: Optional[str] = None) -> Admitted:
        self.tasks.append(task)
        task_id = f"t{len(self.tasks) - 1}"
        return Admitted(task_id, "a", PlacementDecision("a"), Admission(task_id, "a", 0, 0, prompt_tokens=7))

    async def open_stream(self, task_id: str) -> Stream:
        return Stream(task_id, self.events[int(task_id[1:])])

    async def cancel(self, task_id: str) -> None:
        self.cancelled.append(task_id)


def serving(events: list[list[list]], views=None) -> tuple[OpenAIServing, Service]:
    service = Service(events)
    return OpenAIServing(service, Registry(views or [view("a")])), service


def token(index: int, text: str, first: int, logprobs: Optional[list] = None) -> tuple[int, str, dict]:
    data: dict[str, Any] = {"t": text, "i": first}
    if logprobs is not None:
        data["logprobs"] = logprobs
    return (index, "token", data)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("model, body, param", [
    (CompletionRequest, {"prompt": "x", "n": 0}, "n"),
    (CompletionRequest, {"prompt": "x", "n": 9}, "n"),
    (CompletionRequest, {"prompt": "x", "logprobs": 6}, "logprobs"),
    (CompletionRequest, {"prompt": "x", "logit_bias": {"hello": 5}}, "logit_bias"),
    (CompletionRequest, {"prompt": "x", "logit_bias": {"12": 101}}, "logit_bias"),
    (ChatCompletionRequest, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (ChatCompletionRequest, {"top_logprobs": 2}, "top_logprobs"),
    (ChatCompletionRequest, {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}}},
     "response_format.json_schema.schema"),
    (ChatCompletionRequest, {"response_format": {"type": "yaml"}}, "response_format.type"),
    (ChatCompletionRequest, {"presence_penalty": 2.5}, "presence_penalty"),
])
def test_bad_values_are_400s_naming_the_field(model, body, param):
    base = {"model": "smol"} if model is CompletionRequest else dict(CHAT)
    with pytest.raises(OpenAIRequestError) as info:
        validated(model, {**base, **body})
    assert info.value.param == param and info.value.http_status == 400
    assert info.value.openai_code is None  # INVALID_PARAMS: a value to fix, not an unsupported field


def test_every_sampling_field_reaches_the_task():
    req = validated(ChatCompletionRequest, {
        **CHAT, "temperature": 0.3, "top_p": 0.9, "top_k": 7, "min_p": 0.05, "typical_p": 0.8,
        "repetition_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": -0.5, "logit_bias": {"42": -100},
        "seed": 5, "stop": "END", "ignore_eos": False, "min_tokens": 2, "max_completion_tokens": 9, "user": "u-1",
        "logprobs": True, "top_logprobs": 3, "response_format": {"type": "json_schema", "json_schema": {
            "name": "p", "schema": SCHEMA, "strict": True}}})
    task = task_request(req, "prompt", Target("ref", ()), req.stop_list(), logprobs=req.alternatives())
    assert (task.temperature, task.top_p, task.top_k, task.min_p, task.typical_p) == (0.3, 0.9, 7, 0.05, 0.8)
    assert (task.repetition_penalty, task.presence_penalty, task.frequency_penalty) == (1.1, 0.5, -0.5)
    assert task.bias_pairs() == ((42, -100.0),) and task.seed == 5 and task.stop == ["END"]
    assert (task.min_tokens, task.max_tokens, task.user, task.logprobs) == (2, 9, "u-1", 3)
    assert json.loads(task.json_schema) == SCHEMA and task.prompt_logprobs is None
    assert engine_features.requested(task) == ["presence_penalty", "frequency_penalty", "typical_p", "logit_bias",
                                               "min_tokens", "logprobs", "json_schema"]


def test_json_object_is_any_object_and_echo_scores_the_prompt():
    req = validated(ChatCompletionRequest, {**CHAT, "response_format": {"type": "json_object"}})
    assert json.loads(req.json_schema()) == {"type": "object"}
    req = validated(CompletionRequest, {"model": "smol", "prompt": "x", "echo": True, "logprobs": 1, "max_tokens": 0})
    serving_, backend = serving([[[STARTED, (1, "token", {"t": "", "i": 0, "prompt_logprobs": [
        lp("x", None), lp("y", -0.5, ("y", -0.5))]}), end(2, 0, "length")]]])
    body = run(serving_.completion(req, "")).body
    task = backend.tasks[0]
    assert (task.max_tokens, task.prompt_logprobs, task.logprobs) == (0, 1, 1)
    choice = body.choices[0]
    assert choice.text == "x" and body.usage.completion_tokens == 0
    assert choice.logprobs.model_dump() == {"tokens": ["x", "y"], "token_logprobs": [None, -0.5],
                                            "top_logprobs": [None, {"y": -0.5}], "text_offset": [0, 1]}
    with pytest.raises(OpenAIRequestError):
        validated(CompletionRequest, {"model": "smol", "prompt": "x", "max_tokens": 0})


def test_v2_task_fields_are_checked_the_same_way():
    TaskRequest(prompt="x", max_tokens=0, prompt_logprobs=0)
    for bad, field in (({"logit_bias": {"x1": 1}}, "logit_bias"), ({"json_schema": {"type": 5}}, "json_schema"),
                       ({"json_schema": "{not json"}, "json_schema"), ({"min_tokens": 5}, "min_tokens"),
                       ({"logprobs": 21}, "logprobs"), ({"grammar": "root ::= x", "json_schema": {}}, "grammar")):
        with pytest.raises(ValueError) as info:
            TaskRequest(prompt="x", max_tokens=3, **bad)
        assert info.value.errors()[0]["loc"] == (field,), bad


# --------------------------------------------------------------------------- engines


def test_an_engine_that_cannot_honour_a_parameter_refuses_it_by_name():
    req = validated(CompletionRequest, {"model": "smol", "prompt": "x", "logprobs": 2})
    serving_, backend = serving([[]], views=[view("m", engine="mock")])
    with pytest.raises(OpenAIRequestError) as info:
        run(serving_.completion(req, ""))
    error = info.value
    assert (error.param, error.engine, error.openai_code) == ("logprobs", "mock", "unsupported_parameter")
    assert "logprobs" in error.message and "'mock'" in error.message and backend.tasks == []
    vllm_typical = TaskRequest(prompt="x", max_tokens=3, typical_p=0.5)
    with pytest.raises(Exception) as info:
        engine_features.check("vllm", vllm_typical, "p")
    assert "typical_p" in str(info.value) and "'vllm'" in str(info.value)
    unbatched = engine_features.variant("llamacpp", {"batching": False})
    assert engine_features.unsupported(unbatched, ["logprobs", "grammar"]) == ["logprobs"]
    assert engine_features.variant("llamacpp", {}) == "llamacpp"


def test_pools_whose_engine_cannot_honour_it_are_left_out():
    req = validated(CompletionRequest, {"model": "smol", "prompt": "x", "presence_penalty": 0.4})
    serving_, backend = serving([[[STARTED, end(1, 0)]]], views=[view("m", engine="mock"), view("a")])
    run(serving_.completion(req, ""))
    placement = backend.tasks[0].placement
    assert placement.prefer_pools == ["a"] and placement.allow_fallback is False
    plain = validated(CompletionRequest, {"model": "smol", "prompt": "x", "presence_penalty": 0})
    serving_, backend = serving([[[STARTED, end(1, 0)]]], views=[view("m", engine="mock"), view("a")])
    run(serving_.completion(plain, ""))
    assert backend.tasks[0].placement is None


# --------------------------------------------------------------------------- n and logprobs


def test_n_choices_are_tasks_on_one_pool_with_consecutive_seeds_and_summed_usage():
    events = [[[STARTED, token(1, "A", 0, [lp("A", -0.1, ("A", -0.1), ("B", -2.0))]), end(2, 1)]],
              [[STARTED, token(1, "B", 0, [lp("B", -0.7, ("A", -0.1), ("B", -0.7))]),
                token(2, "C", 1, [lp("C", -0.2)]), end(3, 2, "length")]]]
    serving_, backend = serving(events)
    req = validated(ChatCompletionRequest, {**CHAT, "n": 2, "seed": 10, "logprobs": True, "top_logprobs": 2})
    body = run(serving_.chat(req, "")).body
    assert [t.seed for t in backend.tasks] == [10, 11]
    assert backend.tasks[1].placement.pin_pool_id == "a" and backend.tasks[0].logprobs == 2
    assert [(c.index, c.message.content, c.finish_reason) for c in body.choices] == [
        (0, "A", "stop"), (1, "BC", "length")]
    assert body.usage.completion_tokens == 3 and body.usage.prompt_tokens == 7
    first = body.choices[1].logprobs.content[0]
    assert (first.token, first.logprob, first.bytes) == ("B", -0.7, [66])
    assert [(t.token, t.logprob) for t in first.top_logprobs] == [("A", -0.1), ("B", -0.7)]


def test_n_streams_carry_each_choice_index_and_usage_once_at_the_end():
    events = [[[STARTED, token(1, "A", 0)], [end(2, 1)]],
              [[STARTED, token(1, "BC", 0)], [end(2, 2, "length")]]]
    serving_, _ = serving(events)
    req = validated(CompletionRequest, {"model": "smol", "prompt": "x", "n": 2, "stream": True,
                                        "stream_options": {"include_usage": True}})
    lines = data_lines(run(drain(run(serving_.completion(req, "")))))
    assert lines[-1] == "[DONE]"
    texts: dict[int, str] = {0: "", 1: ""}
    finishes = {}
    for chunk in lines[:-2]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
    assert texts == {0: "A", 1: "BC"} and finishes == {0: "stop", 1: "length"}
    assert lines[-2]["choices"] == [] and lines[-2]["usage"]["completion_tokens"] == 3


def test_one_failing_choice_cancels_the_others():
    failed = (2, "error", {"code": "INTERNAL", "message": "boom"})
    events = [[[STARTED, token(1, "A", 0)], [failed]], [[STARTED]]]
    serving_, backend = serving(events)
    req = validated(CompletionRequest, {"model": "smol", "prompt": "x", "n": 2, "stream": True})
    reply = run(serving_.completion(req, ""))

    async def scenario():
        lines = data_lines(await drain(reply))
        await asyncio.sleep(0.01)
        return lines

    lines = run(scenario())
    assert lines[-1] == "[DONE]" and lines[-2]["error"]["code"] == "INTERNAL"
    assert "t1" in backend.cancelled


def test_streamed_completion_logprobs_have_offsets_and_echo_waits_for_the_prompt():
    events = [[[STARTED, (1, "token", {"t": "", "i": 0, "prompt_logprobs": [lp("Hi", None), lp("!", -1.0)]}),
                token(2, " yo", 0, [lp(" yo", -0.3, (" yo", -0.3))])], [end(3, 1)]]]
    serving_, _ = serving(events)
    req = validated(CompletionRequest, {"model": "smol", "prompt": "Hi!", "echo": True, "logprobs": 1,
                                        "stream": True})
    lines = data_lines(run(drain(run(serving_.completion(req, "")))))
    echo, out = lines[0]["choices"][0], lines[1]["choices"][0]
    assert echo["text"] == "Hi!" and echo["logprobs"]["token_logprobs"] == [None, -1.0]
    assert out["text"] == " yo" and out["logprobs"] == {"tokens": [" yo"], "token_logprobs": [-0.3],
                                                        "top_logprobs": [{" yo": -0.3}], "text_offset": [3]}


# --------------------------------------------------------------------------- the pool's counting


def test_pieces_count_their_tokens_and_prompt_logprobs_count_none():
    async def scenario():
        record = TaskRecord(task_id="t", priority="interactive", prompt="p", params=None, ctx=64,
                            prompt_tokens=3, queue_position=0, predicted_start_ms=0)
        record.bind_loop(asyncio.get_running_loop())
        record.push("started", {})
        record.push_prompt(logprob_payload([TokenLogprob("p", None), TokenLogprob("q", float("-inf"))]))
        record.push_token("ab", tokens=2)
        record.push_token("", tokens=1)  # a stop string cut away: counted, no event
        record.push_token("c", logprobs=logprob_payload([TokenLogprob("c", -0.5, (99,), (("c", -0.5),))]))
        events, _ = await record.poll(0, 0.0)
        cut = record.cut_and_end(0)
        return record, events, cut

    record, events, cut = run(scenario())
    tokens = [data for _, kind, data in events if kind == "token"]
    assert [t["i"] for t in tokens] == [0, 0, 3] and record.tokens_out == 4
    assert tokens[0]["prompt_logprobs"][1]["logprob"] == -9999.0 and tokens[0]["t"] == ""
    assert tokens[2]["logprobs"] == [{"token": "c", "logprob": -0.5, "bytes": [99],
                                      "top": [{"token": "c", "logprob": -0.5}]}]
    assert cut == len(events) and record.tokens_before(2) == 0 and record.tokens_before(3) == 3


# --------------------------------------------------------------------------- external pass-through


def test_an_external_upstream_gets_every_set_field_under_both_servers_names():
    from orch.engines.base import GenerationParams
    from orch.engines.external import sampling_extensions

    sent = sampling_extensions(GenerationParams(
        max_tokens=4, seed=1, presence_penalty=0.5, frequency_penalty=0.1, typical_p=0.9, logit_bias=((5, -100.0),),
        min_tokens=2, logprobs=2, prompt_logprobs=1, json_schema='{"type":"object"}'))
    assert sent["presence_penalty"] == 0.5 and sent["frequency_penalty"] == 0.1 and sent["typical_p"] == 0.9
    assert sent["logit_bias"] == {"5": -100.0} and sent["min_tokens"] == 2
    assert sent["logprobs"] == 2 and sent["echo"] is True
    assert sent["response_format"]["json_schema"]["schema"] == {"type": "object"} == sent["json_schema"]
    grammar = sampling_extensions(GenerationParams(max_tokens=4, seed=1, grammar='root ::= "a"'))
    assert grammar == {"grammar": 'root ::= "a"', "structured_outputs": {"grammar": 'root ::= "a"'}}


def test_an_echoed_upstream_stream_becomes_a_prompt_piece_then_output():
    from orch.engines.base import EngineError, Piece
    from orch.engines.external import UpstreamPieces

    pieces = UpstreamPieces("Hi there")
    first = pieces.of({"text": "Hi there!", "logprobs": {
        "tokens": ["Hi", " there", "!"], "token_logprobs": [None, -1.5, -0.5],
        "top_logprobs": [None, {" there": -1.5}, {"!": -0.5}], "text_offset": [0, 2, 8]}})
    assert len(first) == 2 and first[0].prompt and first[0].text == "Hi there" and first[0].tokens == 2
    assert [lp.logprob for lp in first[0].logprobs] == [None, -1.5]
    assert isinstance(first[1], Piece) and first[1].text == "!" and first[1].tokens == 1
    assert first[1].logprobs[0].top == (("!", -0.5),)
    assert pieces.of({"text": " yo"}) == [" yo"]
    with pytest.raises(EngineError):
        UpstreamPieces("Hello").of({"text": "Other text"})


def test_echo_without_logprobs_streams_the_prompt_once():
    events = [[[STARTED, (1, "token", {"t": "", "i": 0, "prompt_logprobs": [lp("Hi", None)]})], [end(2, 0, "length")]]]
    serving_, backend = serving(events)
    req = validated(CompletionRequest, {"model": "smol", "prompt": "Hi", "echo": True, "max_tokens": 0,
                                        "stream": True})
    lines = data_lines(run(drain(run(serving_.completion(req, "")))))
    assert [c["choices"][0]["text"] for c in lines[:-1]] == ["Hi", ""] and lines[0]["choices"][0]["logprobs"] is None
    assert backend.tasks[0].prompt_logprobs == 0
