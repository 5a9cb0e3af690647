"""The OpenAI API's depth end to end: logprobs, ``n``, structured output, echo scoring and the
typed refusals, through real Serve HTTP, real pool actors and the real llama.cpp engine on
SmolLM2 (plus a mock pool, whose engine honours none of these, for the per-engine refusal).
The official ``openai`` SDK is the client where it has the call."""

from __future__ import annotations

import json
import math
from typing import Iterator, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.conftest import home_config, openai_sdk, read_sse, wait_for

pytestmark = pytest.mark.integration

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(deploy) -> httpx.Client:
    config = home_config(slots=2)
    config["pools"].append({"id": "mocky", "engine": "mock", "model": "mock-mocky", "model_aliases": ["mocky"],
                            "num_gpus": 0, "num_cpus": 0, "allow_cpu": True, "slots": 1,
                            "engine_options": {"tokens_per_s": 500}})
    config["namespace"] = "orch-it-openai-depth"
    client = deploy(config, name="orch-openai-depth", route_prefix="/")
    # /readyz is 200 once one pool is Ready; these tests need both.
    wait_for(lambda: all(p["ready"] for p in client.get("/readyz").json()["pools"].values()), 120)
    return client


@pytest.fixture(scope="module")
def oai(client) -> Iterator[openai.OpenAI]:
    sdk = openai_sdk(client, 120)
    yield sdk
    sdk.close()


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# --------------------------------------------------------------------------- logprobs and n


def test_completion_logprobs_plain_and_streamed(oai):
    answer = oai.completions.create(model="smollm2", prompt=PROMPT, max_tokens=6, logprobs=3, seed=4,
                                    temperature=0)
    lp = answer.choices[0].logprobs
    assert len(lp.tokens) == answer.usage.completion_tokens == len(lp.token_logprobs) == len(lp.text_offset)
    assert "".join(lp.tokens) == answer.choices[0].text
    for value, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 1 <= len(top) <= 3
        assert math.isclose(value, max(top.values()), abs_tol=1e-4)  # greedy: the token is the likeliest
    streamed = list(oai.completions.create(model="smollm2", prompt=PROMPT, max_tokens=6, logprobs=3, seed=4,
                                           temperature=0, stream=True))
    tokens = [t for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
              for t in chunk.choices[0].logprobs.tokens]
    assert tokens == lp.tokens


def test_chat_logprobs_and_two_choices_with_the_sdk(oai):
    answer = oai.chat.completions.create(model="smollm2", messages=chat("Name a colour."), max_tokens=5, n=2,
                                         seed=7, temperature=1.0, logprobs=True, top_logprobs=2)
    assert [choice.index for choice in answer.choices] == [0, 1]
    counted = 0
    for choice in answer.choices:
        content = choice.logprobs.content
        counted += len(content)
        assert "".join(entry.token for entry in content) == choice.message.content
        for entry in content:
            assert entry.logprob <= 0 and bytes(entry.bytes).decode("utf-8", "replace")
            assert 1 <= len(entry.top_logprobs) <= 2
    assert answer.usage.completion_tokens == counted
    indexes = {chunk.choices[0].index for chunk in oai.chat.completions.create(
        model="smollm2", messages=chat("Hi"), max_tokens=3, n=2, seed=1, stream=True) if chunk.choices}
    assert indexes == {0, 1}


def test_v2_token_events_carry_logprobs(client):
    response = client.post("/v2/tasks", json={"prompt": PROMPT, "max_tokens": 4, "seed": 2, "logprobs": 1,
                                              "temperature": 0, "model_ref": "smollm2"})
    assert response.status_code == 202, response.text
    with client.stream("GET", f"/v2/tasks/{response.json()['task_id']}/events") as stream:
        events = read_sse(stream)
    tokens = [data for _, kind, data in events if kind == "token"]
    assert tokens and all(len(t["logprobs"]) >= 1 and t["logprobs"][0]["logprob"] <= 0 for t in tokens)
    assert sum(len(t["logprobs"]) for t in tokens) == events[-1][2]["tokens_out"]


def test_echo_scores_the_prompt_as_the_bare_engine_does(client):
    """A loglikelihood request as lm-evaluation-harness's local-completions sends it."""
    from llama_cpp import Llama

    from orch.engines.vllm_convert import shipped_gguf

    body = {"model": "smollm2", "prompt": [PROMPT + " Paris"], "echo": True, "logprobs": 1, "temperature": 0,
            "seed": 1234}
    scored = {}
    for max_tokens in (0, 1):
        response = client.post("/v1/completions", json=dict(body, max_tokens=max_tokens))
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["text"].startswith(PROMPT + " Paris")
        scored[max_tokens] = choice["logprobs"]
    prompt_tokens = len(scored[0]["tokens"])
    assert scored[0]["token_logprobs"][0] is None and len(scored[1]["tokens"]) == prompt_tokens + 1
    assert scored[1]["token_logprobs"][:prompt_tokens] == pytest.approx(scored[0]["token_logprobs"], abs=1e-3)

    # The pool's engine runs llama.cpp with flash attention (as llama-server does on CPU); so does the reference.
    bare = Llama(model_path=str(shipped_gguf()), n_ctx=256, logits_all=True, n_threads=1, flash_attn=True,
                 verbose=False)
    ids = bare.tokenize((PROMPT + " Paris").encode(), add_bos=True, special=False)
    assert len(ids) == prompt_tokens
    bare.eval(ids)
    expected = []
    for position in range(1, len(ids)):
        row = bare.scores[position - 1]
        top = max(row)
        expected.append(float(row[ids[position]] - top - math.log(sum(math.exp(x - top) for x in row))))
    assert scored[0]["token_logprobs"][1:] == pytest.approx(expected, abs=1e-3)


# --------------------------------------------------------------------------- structured output


# Bounded strings and lists: a 135M model may otherwise ramble inside a string until max_tokens.
class Address(BaseModel):
    city: str = Field(max_length=24)
    zip_code: str = Field(max_length=10)


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int
    role: Literal["admin", "user", "guest"]
    tags: list[str] = Field(max_length=3)
    address: Address


def test_parse_with_a_pydantic_model_gives_valid_json(oai):
    answer = oai.chat.completions.parse(model="smollm2", messages=chat("Describe a person as JSON."),
                                        response_format=Person, max_tokens=200, seed=3, temperature=0.7)
    choice = answer.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), Person.model_json_schema())
    assert isinstance(choice.message.parsed, Person)


def test_json_object_and_strict_schema_are_deterministic(client):
    body = {"model": "smollm2", "messages": chat("Reply with a JSON object with key ok set to true."),
            "max_tokens": 60, "seed": 9, "temperature": 0, "response_format": {"type": "json_object"}}
    answer = client.post("/v1/chat/completions", json=body).json()
    assert isinstance(json.loads(answer["choices"][0]["message"]["content"]), dict)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "enum": [1, 2]}},
              "required": ["ok", "n"], "additionalProperties": False}
    task = {"prompt": "JSON:", "max_tokens": 40, "seed": 5, "determinism": "strict", "json_schema": schema,
            "model_ref": "smollm2"}
    texts = []
    for _ in range(2):
        admitted = client.post("/v2/tasks", json=task)
        assert admitted.status_code == 202, admitted.text
        with client.stream("GET", f"/v2/tasks/{admitted.json()['task_id']}/events") as stream:
            texts.append("".join(d["t"] for _, kind, d in read_sse(stream) if kind == "token"))
    jsonschema.validate(json.loads(texts[0]), schema)
    assert texts[0] == texts[1]


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("path, extra, param", [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "required": "name"}}}}, "response_format.json_schema.schema"),
    ("/v1/chat/completions", {"n": 0}, "n"),
    ("/v1/chat/completions", {"n": 9}, "n"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/completions", {"logprobs": 6}, "logprobs"),
    ("/v1/completions", {"logit_bias": {"the": 5}}, "logit_bias"),
])
def test_bad_values_are_typed_400s_naming_the_field(client, path, extra, param):
    body = {"model": "smollm2", "max_tokens": 2, **extra}
    body.update({"messages": chat("hi")} if "chat" in path else {"prompt": "hi"})
    response = client.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == "INVALID_PARAMS" and error["type"] == "invalid_request_error"


def test_an_engine_that_cannot_honour_a_parameter_refuses_it_by_name(client):
    response = client.post("/v1/completions", json={"model": "mocky", "prompt": "hi", "max_tokens": 2,
                                                    "logprobs": 1})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["engine"], error["code"]) == ("logprobs", "mock", "unsupported_parameter")
    v2 = client.post("/v2/tasks", json={"prompt": "hi", "max_tokens": 2, "model_ref": "mocky",
                                        "presence_penalty": 1.0})
    assert v2.status_code == 400 and v2.json()["engine"] == "mock" and "presence_penalty" in v2.json()["message"]


def test_capabilities_and_models_list_each_pool_s_parameters(client, oai):
    answer = client.get("/v2/meta/capabilities")
    assert answer.status_code == 200, answer.text
    pools = {pool["pool_id"]: pool for pool in answer.json()["pools"]}
    assert {"logprobs", "json_schema", "logit_bias", "typical_p"} <= set(pools["default"]["parameters"])
    assert "structured_output" in pools["default"]["features"]
    # SmolLM2's template shows no tools: forced calls only (constrained), no `auto`.
    assert "tools" in pools["default"]["features"] and "tool_choice_auto" not in pools["default"]["features"]
    assert "tools" not in pools["mocky"]["features"]
    assert "logprobs" not in pools["mocky"]["parameters"] and "seed" in pools["mocky"]["parameters"]
    card = client.get("/v1/models/smollm2").json()
    assert card["pools"][0]["engine"] == "llamacpp" and "logprobs" in card["pools"][0]["parameters"]
