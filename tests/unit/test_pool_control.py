"""PoolManager operator control, transcripts and embeddings, on the mock engine (no Ray).

The mock engine's speed is set per pool, so drains, reloads and purges happen at known
moments of a task's life.
"""

from __future__ import annotations

import asyncio

from orch.api.tasks import EmbeddingRequest, TaskRequest
from orch.artifacts.store import artifact_id
from orch.config import PoolConfig
from orch.pools.manager import PoolManager


def mock_pool(**overrides) -> PoolManager:
    fields = dict(id="m", engine="mock", model="mock-model", num_gpus=0, allow_cpu=True, ctx=512,
                  engine_options={"tokens_per_s": 400, "embedding_dim": 8}, queue={"capacity": 8})
    fields.update(overrides)
    return PoolManager(PoolConfig.model_validate(fields))


def request(**fields) -> TaskRequest:
    fields.setdefault("prompt", "tell a story")
    fields.setdefault("max_tokens", 4)
    return TaskRequest.model_validate(fields)


async def events_of(manager: PoolManager, task_id: str) -> list[tuple[int, str, dict]]:
    events, cursor = [], 0
    for _ in range(2000):
        result = await manager.poll(task_id, cursor, 5.0)
        events.extend(result.events)
        if result.events:
            cursor = result.events[-1][0] + 1
        if result.done:
            return events
    raise AssertionError("stream did not end")


def run(scenario):
    return asyncio.run(scenario())


def test_every_terminal_event_names_a_transcript_that_listeners_receive():
    async def scenario():
        manager = mock_pool()
        received = []

        async def listener(summary):
            received.append(summary)

        manager.finish_listeners.append(listener)
        await manager.start()
        await manager.submit(request(prompt="secret words here", seed=5, session_id="s1"), "ok")
        await manager.submit(request(prompt="@fault=error:2", max_tokens=6), "bad")
        ok, bad = await events_of(manager, "ok"), await events_of(manager, "bad")
        await asyncio.sleep(0.05)
        await manager.stop()
        return ok, bad, received

    ok, bad, received = run(scenario)
    assert ok[-1][1] == "end" and bad[-1][1] == "error"
    by_task = {summary["task_id"]: summary for summary in received}
    assert set(by_task) == {"ok", "bad"}
    for events, task_id in ((ok, "ok"), (bad, "bad")):
        summary = by_task[task_id]
        assert events[-1][2]["transcript_id"] == summary["transcript_id"] == artifact_id(summary["transcript"])
    good = by_task["ok"]["transcript"]["content"]
    assert "secret words here" not in str(by_task["ok"]["transcript"])
    assert good["seed"] == 5 and good["tokens_out"] == 4 and good["outcome"] == "end"
    assert [e["event"] for e in good["events"]] == [kind for _, kind, _ in ok]
    assert by_task["ok"]["session_id"] == "s1" and by_task["ok"]["tokens_out"] == 4
    failed = by_task["bad"]["transcript"]["content"]
    assert failed["outcome"] == "error" and failed["error"]["code"] == "INTERNAL" and failed["tokens_out"] == 2


def test_drain_refuses_new_work_and_finishes_queued_work():
    async def scenario():
        manager = mock_pool()
        await manager.start()
        await manager.submit(request(max_tokens=40), "running")
        await asyncio.sleep(0.02)  # the only slot picks it up
        await manager.submit(request(max_tokens=4), "queued")
        drained = await manager.drain(None)
        refused = await manager.submit(request(), "late")
        results = [await events_of(manager, t) for t in ("running", "queued")]
        snapshot = manager.snapshot()
        await manager.stop()
        return drained, refused, results, snapshot

    drained, refused, results, snapshot = run(scenario)
    assert drained["draining"] and drained["queued"] == 1
    assert refused.error.code == "POOL_UNREADY" and "draining" in refused.error.message
    assert all(events[-1][1] == "end" for events in results)
    assert snapshot.drained is True


def test_drain_deadline_ends_leftovers_with_retriable_errors():
    async def scenario():
        manager = mock_pool(engine_options={"tokens_per_s": 50})
        await manager.start()
        await manager.submit(request(max_tokens=500), "long")
        await manager.submit(request(max_tokens=500), "waiting")
        await manager.drain(100)
        results = [await events_of(manager, t) for t in ("long", "waiting")]
        for _ in range(100):  # the engine thread stops at its next token
            if manager.active_slots == 0 and len(manager.queue) == 0:
                break
            await asyncio.sleep(0.01)
        idle = manager.active_slots == 0 and len(manager.queue) == 0
        await manager.stop()
        return results, idle

    results, idle = run(scenario)
    for events in results:
        kind, data = events[-1][1:]
        assert kind == "error" and data["code"] == "POOL_UNAVAILABLE" and data["retriable"] is True
    assert idle


def test_reload_failure_keeps_the_old_engine_serving():
    async def scenario():
        manager = mock_pool()
        await manager.start()
        old_engine = manager.engine
        result = await manager.reload("file:/nonexistent/model.gguf")
        # A mock pool treats any ref as loadable, so force a failing load through the options.
        manager.config = manager.config.model_copy(update={"engine_options": {"fail_load": "driver lost"}})
        failed = await manager.reload("other-model")
        await manager.submit(request(), "after")
        events = await events_of(manager, "after")
        state = (manager.engine is not old_engine, manager.model_ref, manager.ready)
        await manager.stop()
        return result, failed, events, state

    result, failed, events, (swapped, model_ref, ready) = run(scenario)
    assert result["reloaded"] is True and result["model_ref"] == "file:/nonexistent/model.gguf"
    assert failed["reloaded"] is False and failed["rolled_back"] is True and "driver lost" in failed["error"]
    assert swapped and model_ref == "file:/nonexistent/model.gguf" and ready
    assert events[-1][1] == "end"


def test_reload_waits_for_running_tasks_and_keeps_queued_ones():
    async def scenario():
        manager = mock_pool(engine_options={"tokens_per_s": 200})
        await manager.start()
        await manager.submit(request(max_tokens=30), "running")
        await asyncio.sleep(0.02)
        reload = asyncio.create_task(manager.reload("new-model"))
        await asyncio.sleep(0.01)
        admitted = await manager.submit(request(max_tokens=3), "during")
        result = await reload
        running, during = await events_of(manager, "running"), await events_of(manager, "during")
        await manager.stop()
        return result, admitted, running, during

    result, admitted, running, during = run(scenario)
    assert result["reloaded"] is True and admitted.error is None
    assert running[-1][1] == "end" and running[-1][2]["tokens_out"] == 30
    assert during[-1][1] == "end"


def test_purge_drops_queued_tasks_only():
    async def scenario():
        manager = mock_pool(engine_options={"tokens_per_s": 200})
        await manager.start()
        await manager.submit(request(max_tokens=40), "running")
        await asyncio.sleep(0.02)
        for n in range(3):
            await manager.submit(request(), f"q{n}")
        result = await manager.purge()
        queued = [await events_of(manager, f"q{n}") for n in range(3)]
        running = await events_of(manager, "running")
        await manager.stop()
        return result, queued, running

    result, queued, running = run(scenario)
    assert result["purged_queued"] == 3 and result["running"] == 1
    assert all(events[-1][1] == "error" and events[-1][2]["code"] == "POOL_UNAVAILABLE" for events in queued)
    assert running[-1][1] == "end"


def test_embeddings_go_through_the_queue_and_end_with_vectors():
    async def scenario():
        manager = mock_pool()
        await manager.start()
        admitted = await manager.submit(EmbeddingRequest(inputs=["alpha beta", "gamma"]), "emb")
        events = await events_of(manager, "emb")
        plain = mock_pool(engine_options={})
        await plain.start()
        refused = await plain.submit(EmbeddingRequest(inputs=["x"]), "no")
        await manager.stop()
        await plain.stop()
        return admitted, events, refused, manager.workloads(), plain.workloads()

    admitted, events, refused, workloads, plain_workloads = run(scenario)
    assert admitted.admission.prompt_tokens == 5
    end = events[-1][2]
    assert events[-1][1] == "end" and len(end["embeddings"]) == 2 and len(end["embeddings"][0]) == 8
    assert end["embeddings"][0] != end["embeddings"][1]
    assert refused.error.code == "INVALID_PARAMS" and "embeddings" in refused.error.message
    assert workloads == ("completion", "embedding") and plain_workloads == ("completion",)
