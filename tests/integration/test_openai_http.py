"""The OpenAI-compatible API end to end: the official ``openai`` client against real Serve
HTTP, real pool actors and real llama.cpp on SmolLM2 (a completion pool and an embedding
pool)."""

from __future__ import annotations

import json
import math
import time
from typing import Iterator

import httpx
import openai
import pytest
import ray

from orch.api.openai import ChatCompletionChunk, OpenAIErrorResponse
from orch.pools.actor import pool_handle
from tests.conftest import home_config

pytestmark = pytest.mark.integration

NAMESPACE = "orch-it-openai"
CAPACITY = 2
LONG_PROMPT = "Once upon a time"
EMBEDDING_DIM = 576


@pytest.fixture(scope="module")
def client(deploy) -> httpx.Client:
    config = home_config(queue={"capacity": CAPACITY, "policy": "reject"})
    embed = dict(config["pools"][0], id="embed", model_aliases=["smollm2-embed"], engine_options={"embedding": True},
                 ctx=512, threads=1, queue={"capacity": 8, "policy": "reject"})
    config["pools"].append(embed)
    config["namespace"] = NAMESPACE
    client = deploy(config, name="orch-openai", route_prefix="/")
    # /readyz is 200 once one pool is Ready; these tests need both.
    wait_for(lambda: all(p["ready"] for p in client.get("/readyz").json()["pools"].values()), 120, "both pools")
    return client


@pytest.fixture(scope="module")
def oai(client) -> Iterator[openai.OpenAI]:
    base = str(client.base_url).rstrip("/")
    sdk = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
    yield sdk
    sdk.close()


def snapshot(pool_id: str = "default") -> dict:
    """The pool's view and detail fields in one dict (the assertions read them by name)."""
    report = ray.get(pool_handle(pool_id, NAMESPACE).report.remote())
    return {**vars(report.detail), **vars(report.view)}


def data_lines(response: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def assert_openai_error(response: httpx.Response, status: int, error_type: str, code: str | None = None,
                        param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    OpenAIErrorResponse.model_validate(response.json())
    assert error["message"] and error["type"] == error_type
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


def load(pool_id: str = "default") -> tuple[int, int]:
    """(running, queued) tasks of a pool."""
    snap = snapshot(pool_id)
    return snap["active_slots"], snap["queue_depth"]


def occupy_the_slot(client: httpx.Client, seed: int) -> str:
    """Start a long task on the idle default pool (v2, by its alias) and wait until it runs."""
    wait_for(lambda: load() == (0, 0), what="the default pool to be idle")
    response = client.post("/v2/tasks", json={"prompt": LONG_PROMPT, "max_tokens": 500, "seed": seed,
                                              "model_ref": "smollm2", "ignore_eos": True})
    assert response.status_code == 202, response.text
    wait_for(lambda: load() == (1, 0), what="the long task to start")
    return response.json()["task_id"]


def wait_for(predicate, timeout_s: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# --------------------------------------------------------------------------- models


def test_models_lists_what_ready_pools_serve(oai):
    models = {model.id: model for model in oai.models.list()}
    assert {"smollm2", "SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1", "smollm2-embed"} <= set(models)
    assert all(model.object == "model" and model.owned_by == "llama-orch" for model in models.values())
    assert oai.models.retrieve("smollm2").id == "smollm2"
    with pytest.raises(openai.NotFoundError) as caught:
        oai.models.retrieve("gpt-4o")
    assert caught.value.code == "model_not_found"


def test_every_listed_model_places_on_the_pool_serving_it(oai):
    before = {pool: snapshot(pool)["counters"]["enqueued"] for pool in ("default", "embed")}
    answer = oai.completions.create(model="smollm2-embed", prompt=LONG_PROMPT, max_tokens=2, seed=1)
    assert answer.usage.completion_tokens == 2
    assert snapshot("embed")["counters"]["enqueued"] == before["embed"] + 1
    assert snapshot("default")["counters"]["enqueued"] == before["default"]
    for model in oai.models.list():
        assert oai.completions.create(model=model.id, prompt=LONG_PROMPT, max_tokens=1).choices[0].text


# --------------------------------------------------------------------------- completions


def test_completion_with_usage_and_the_same_text_streamed(oai):
    plain = oai.completions.create(model="smollm2", prompt=LONG_PROMPT, max_tokens=8, seed=3)
    assert plain.object == "text_completion" and plain.id.startswith("cmpl-")
    choice = plain.choices[0]
    assert choice.text and choice.finish_reason == "length"
    assert plain.usage.completion_tokens == 8
    assert plain.usage.prompt_tokens >= 3
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    assert plain.system_fingerprint and plain.system_fingerprint.startswith("llamacpp-")

    chunks = list(oai.completions.create(model="smollm2", prompt=LONG_PROMPT, max_tokens=8, seed=3, stream=True,
                                         stream_options={"include_usage": True}))
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 8
    assert usage_chunk.usage.prompt_tokens == plain.usage.prompt_tokens
    text_chunks = [c for c in chunks[:-1] if c.choices[0].text]
    assert len(text_chunks) == 8
    assert "".join(c.choices[0].text for c in chunks[:-1]) == choice.text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert all(c.id == chunks[0].id for c in chunks)


def test_completion_stream_without_usage_and_echo(oai):
    chunks = list(oai.completions.create(model="SmolLM2-135M-Instruct", prompt=[LONG_PROMPT], max_tokens=4,
                                         seed=5, stream=True))
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    echoed = oai.completions.create(model="smollm2", prompt=LONG_PROMPT, max_tokens=4, seed=5, echo=True)
    streamed = "".join(c.choices[0].text for c in chunks)
    assert echoed.choices[0].text == LONG_PROMPT + streamed


# --------------------------------------------------------------------------- chat


def test_chat_answers_and_stops_at_the_end_of_its_turn(oai):
    answer = oai.chat.completions.create(
        model="smollm2", max_tokens=32, temperature=0, seed=1,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
    )
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    choice = answer.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert "<|im_end|>" not in choice.message.content
    # The rendered prompt (default system turn included) is what was counted.
    assert answer.usage.prompt_tokens > 20
    assert 0 < answer.usage.completion_tokens < 32
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_chat_streams_role_then_content_then_usage(oai):
    stream = oai.chat.completions.create(
        model="smollm2", max_completion_tokens=12, seed=9, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "system", "content": "You are a storyteller."},
                  {"role": "user", "content": [{"type": "text", "text": "Tell me a long story about a dragon"}]}],
    )
    chunks = list(stream)
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks[1:-2] if c.choices[0].delta.content]
    assert len(content) == 12 and "".join(content).strip()
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens > 10


def test_chat_same_seed_gives_identical_text(oai):
    def ask(seed: int) -> str:
        answer = oai.chat.completions.create(model="smollm2", max_tokens=16, temperature=1.0, seed=seed,
                                             messages=[{"role": "user", "content": "Name three fruits"}])
        return answer.choices[0].message.content

    first = ask(77)
    assert first and first.encode() == ask(77).encode()


def test_the_extensions_vllms_benchmark_client_sends_are_honoured(oai, client):
    """``repetition_penalty: 1.0`` and ``ignore_eos: true`` come with every request of vLLM's
    benchmark client: an answer that would end after a few tokens runs to max_tokens."""
    ask = [{"role": "user", "content": "Say OK."}]
    short = oai.chat.completions.create(model="smollm2", max_tokens=24, temperature=0, seed=1, messages=ask)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 24
    vllm_bench = {"repetition_penalty": 1.0, "ignore_eos": True}
    full = oai.chat.completions.create(model="smollm2", max_tokens=24, temperature=0, seed=1, messages=ask,
                                       extra_body=vllm_bench)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 24
    completion = oai.completions.create(model="smollm2", prompt=LONG_PROMPT, max_tokens=16, seed=2,
                                        extra_body=dict(vllm_bench, min_p=0.05))
    assert completion.usage.completion_tokens == 16
    body = {"model": "smollm2", "prompt": "x", "max_tokens": 2, "repetition_penalty": 0}
    assert_openai_error(client.post("/v1/completions", json=body), 400, "invalid_request_error", "INVALID_PARAMS",
                        "repetition_penalty")


# --------------------------------------------------------------------------- embeddings


def test_embeddings_are_normalised_576_dimensional_and_distinct(oai):
    result = oai.embeddings.create(model="smollm2-embed", input=["The cat sat on the mat", "Quantum chromodynamics"])
    vectors = [item.embedding for item in result.data]
    assert [item.index for item in result.data] == [0, 1]
    assert [len(v) for v in vectors] == [EMBEDDING_DIM, EMBEDDING_DIM]
    assert vectors[0] != vectors[1]
    for vector in vectors:
        assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-3)
    assert result.usage.prompt_tokens > 0 and result.usage.total_tokens == result.usage.prompt_tokens
    # The client above asked for base64; floats give the same vector.
    single = oai.embeddings.create(model="smollm2-embed", input="The cat sat on the mat", encoding_format="float")
    assert len(single.data) == 1
    assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(single.data[0].embedding, vectors[0]))


def test_embeddings_need_a_pool_that_serves_them(client):
    response = client.post("/v1/embeddings", json={"model": "smollm2", "input": "x"})
    assert_openai_error(response, 400, "invalid_request_error", "INVALID_PARAMS", "model")
    response = client.post("/v1/embeddings", json={"model": "smollm2-embed", "input": "x", "dimensions": 8})
    assert_openai_error(response, 400, "invalid_request_error", "unsupported_parameter", "dimensions")


# --------------------------------------------------------------------------- errors


def test_unknown_model_is_404_model_not_found(client, oai):
    response = client.post("/v1/chat/completions",
                           json={"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]})
    assert_openai_error(response, 404, "not_found_error", "model_not_found", "model")
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="gpt-3.5-turbo-instruct", prompt="x", max_tokens=1)


@pytest.mark.parametrize(
    "content, param",
    [
        (b"{not json", None),
        (b"\xff\xfe", None),
        (b"", None),
        (b"[1, 2]", None),
        (json.dumps({"model": "smollm2", "prompt": "x", "max_tokens": "many"}).encode(), "max_tokens"),
        (json.dumps({"model": "smollm2", "prompt": "x", "temperature": 5}).encode(), "temperature"),
        (json.dumps({"prompt": "x"}).encode(), "model"),
        (json.dumps({"model": "smollm2", "prompt": ""}).encode(), "prompt"),
        (json.dumps({"model": "smollm2", "prompt": "x", "stop": [""]}).encode(), "stop"),
        (b"{" + b" " * 2_000_000 + b"}", None),
    ],
)
def test_bad_bodies_get_openai_shaped_400(client, content, param):
    response = client.post("/v1/completions", content=content, headers={"X-Correlation-Id": "oai-bad-1"})
    error = assert_openai_error(response, 400, "invalid_request_error", "INVALID_PARAMS", param)
    assert error["correlation_id"] == "oai-bad-1"


def test_bad_chat_messages_name_the_field(client):
    for messages, param in (([], "messages"), ([{"role": "robot", "content": "x"}], "messages[0].role"),
                            ([{"role": "user", "content": 5}], "messages[0].content"), ("hi", "messages")):
        response = client.post("/v1/chat/completions", json={"model": "smollm2", "messages": messages})
        assert_openai_error(response, 400, "invalid_request_error", "INVALID_PARAMS", param)


@pytest.mark.parametrize(
    "path, extra, param",
    [
        ("/v1/chat/completions", {"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
        ("/v1/completions", {"best_of": 2}, "best_of"),
        ("/v1/completions", {"suffix": "and so on"}, "suffix"),
        ("/v1/completions", {"prompt": [[1, 2, 3]]}, "prompt"),
        ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ],
)
def test_unsupported_options_are_refused_naming_the_parameter(client, path, extra, param):
    body = {"model": "smollm2", "max_tokens": 2}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"})
    body.update(extra)
    response = client.post(path, json=body)
    error = assert_openai_error(response, 400, "invalid_request_error", "unsupported_parameter", param)
    assert param in error["message"]


def test_unknown_fields_are_refused_and_harmless_ones_accepted(client):
    body = {"model": "smollm2", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    response = client.post("/v1/chat/completions", json=dict(body, colour="red"))
    assert_openai_error(response, 400, "invalid_request_error", "unknown_parameter", "colour")
    harmless = dict(body, n=1, user="someone", store=False, metadata={"k": "v"}, service_tier="auto",
                    tool_choice="none", parallel_tool_calls=False, response_format={"type": "text"},
                    presence_penalty=0, frequency_penalty=0, logprobs=False, stream=False)
    response = client.post("/v1/chat/completions", json=harmless)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"


def test_full_queue_answers_429_in_openai_shape(client, oai):
    running = occupy_the_slot(client, seed=1)
    queued = []
    try:
        for _ in range(CAPACITY):
            admitted = client.post("/v2/tasks", json={"prompt": "x", "max_tokens": 4, "model_ref": "smollm2"})
            assert admitted.status_code == 202, admitted.text
            queued.append(admitted.json()["task_id"])
        for stream in (False, True):
            response = client.post("/v1/completions", json={"model": "smollm2", "prompt": "x", "max_tokens": 2,
                                                            "stream": stream})
            error = assert_openai_error(response, 429, "rate_limit_error", "ADMISSION_REJECT")
            assert int(response.headers["Retry-After"]) >= 1
            assert int(response.headers["X-Backoff-Ms"]) == error["retry_after_ms"] > 0
            assert error["retriable"] is True and error["policy_label"] == "reject"
        with pytest.raises(openai.RateLimitError):
            oai.chat.completions.create(model="smollm2", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    finally:
        for task_id in [running, *queued]:
            client.post(f"/v2/tasks/{task_id}/cancel")


def test_error_mid_stream_ends_with_an_error_chunk_then_done(client, oai):
    running = occupy_the_slot(client, seed=2)
    try:
        body = {"model": "smollm2", "max_tokens": 4, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        tagged = {"X-Correlation-Id": "mid-1"}
        with client.stream("POST", "/v1/chat/completions", json=body, headers=tagged) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            purged = client.post("/v2/pools/default/purge")  # the queued chat task gets a retriable error
            assert purged.status_code == 202 and purged.json()["purged_queued"] == 1
            lines = data_lines(response)
        # The official client raises the error chunk as an APIError.
        stream = oai.chat.completions.create(**body)
        assert client.post("/v2/pools/default/purge").json()["purged_queued"] == 1
        with pytest.raises(openai.APIError, match="operator purge"):
            list(stream)
    finally:
        client.post(f"/v2/tasks/{running}/cancel")
    assert lines[-1] == "[DONE]"
    assert ChatCompletionChunk.model_validate_json(lines[0]).choices[0].delta.role == "assistant"
    error = OpenAIErrorResponse.model_validate_json(lines[-2]).model_dump()["error"]
    assert error["code"] == "POOL_UNAVAILABLE" and error["type"] == "service_unavailable_error"
    assert error["retriable"] is True and error["message"] and error["correlation_id"] == "mid-1"


def test_client_going_away_mid_stream_cancels_the_task(client):
    before = snapshot()["counters"]["cancelled"]
    body = {"model": "smollm2", "prompt": LONG_PROMPT, "max_tokens": 400, "seed": 4, "stream": True,
            "ignore_eos": True}
    with httpx.Client(base_url=str(client.base_url), timeout=60) as other:
        with other.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            task_id = response.headers["x-task-id"]
            seen = 0
            for line in response.iter_lines():
                if line.startswith("data: "):
                    seen += 1
                    if seen >= 3:
                        break
    # The connection is closed: the task is cancelled and the slot is free again.
    wait_for(lambda: snapshot()["counters"]["cancelled"] > before, what="the abandoned task to be cancelled")
    wait_for(lambda: load() == (0, 0), what="the slot to be freed")
    events = client.get(f"/v2/tasks/{task_id}/events").text
    assert '"finish_reason":"cancelled"' in events


def test_client_going_away_before_a_plain_answer_cancels_the_task(client):
    before = snapshot()["counters"]["cancelled"]
    body = {"model": "smollm2", "prompt": LONG_PROMPT, "max_tokens": 400, "seed": 6, "ignore_eos": True}
    with httpx.Client(base_url=str(client.base_url), timeout=httpx.Timeout(60, read=1.5)) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/completions", json=body)
    wait_for(lambda: snapshot()["counters"]["cancelled"] > before, what="the abandoned task to be cancelled")
    wait_for(lambda: load() == (0, 0), what="the slot to be freed")


def test_openapi_documents_the_openai_routes(client):
    document = client.get("/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models"):
        assert path in document["paths"]
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
    assert chat["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/OpenAIErrorResponse")
    assert client.get("/v1/nope").json()["error"]["type"] == "not_found_error"
