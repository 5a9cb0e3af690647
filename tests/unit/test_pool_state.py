"""A pool's lifecycle: the allowed moves hold, a forbidden one raises, the snapshot's
booleans follow the state, and a real (mock-engine) pool walks the expected path."""

from __future__ import annotations

import asyncio

import pytest

from orch.api.pool_state import PoolState
from orch.api.tasks import TaskRequest
from orch.catalog import binding as bindings
from orch.config import PoolConfig
from orch.engines.base import EngineError
from orch.pools.manager import PoolManager
from orch.pools.state import ALLOWED, Lifecycle, PoolStateError

S = PoolState


def at(state: PoolState) -> Lifecycle:
    life = Lifecycle()
    life.state = state
    return life


@pytest.mark.parametrize("source,target", [(s, t) for s, targets in ALLOWED.items() for t in sorted(targets)])
def test_every_allowed_move_holds(source, target):
    life = at(source)
    life.to(target)
    assert life.state is target


@pytest.mark.parametrize("source,target", [(S.engine_failed, S.ready), (S.stopped, S.loading), (S.new, S.ready),
                                           (S.loading, S.waiting), (S.load_failed, S.ready)])
def test_a_forbidden_move_raises_and_keeps_the_state(source, target):
    life = at(source)
    with pytest.raises(PoolStateError, match=f"from {source.value} to {target.value}"):
        life.to(target)
    assert life.state is source


def test_every_state_has_its_moves_and_staying_is_allowed():
    assert set(ALLOWED) == set(PoolState)
    for state in PoolState:
        life = at(state)
        life.to(state)
        assert life.state is state
    assert not ALLOWED[S.stopped] and ALLOWED[S.engine_failed] == {S.stopped}


def test_the_old_flags_read_from_the_state():
    flags = {state: (at(state).ready, at(state).loading, at(state).engine_failed, at(state).held)
             for state in PoolState}
    assert flags[S.ready] == (True, False, False, None)
    assert flags[S.loading] == (False, True, False, None)
    assert flags[S.engine_failed] == (False, False, True, None)
    assert flags[S.waiting][3] == bindings.WAITING and flags[S.retired][3] == bindings.RETIRED
    assert sum(1 for ready, *_ in flags.values() if ready) == 1


def mock_pool(**fields) -> PoolConfig:
    return PoolConfig.model_validate(dict(dict(id="m", engine="mock", model="mock-model", slots=1), **fields))


def test_a_pool_walks_new_ready_held_ready_failed_stopped():
    async def scenario():
        manager = PoolManager(mock_pool())
        path = [manager.state]
        await manager.start()
        path.append(manager.state)
        waiting = bindings.resolve("m", "mock", "https://127.0.0.1:9/m.gguf", [], [])
        held = await manager.bind(waiting.but(load_key="elsewhere"))
        path.append(manager.state)
        local = bindings.resolve("m", "mock", "mock-model", [], [])
        back = await manager.bind(local)
        path.append(manager.state)
        manager.core.engine_fault(EngineError("driver lost", fatal=True))
        path.append(manager.state)
        still_failed = await manager.bind(local)
        refused = await manager.submit(TaskRequest(prompt="hi", max_tokens=2), "t")
        await manager.stop()
        path.append(manager.state)
        return path, held, back, still_failed, refused

    path, held, back, still_failed, refused = asyncio.run(scenario())
    assert path == [S.new, S.ready, S.waiting, S.ready, S.engine_failed, S.stopped]
    assert held.waiting_for_model and not held.ready
    assert back.ready and not back.waiting_for_model
    assert still_failed.engine_failed and not still_failed.ready and still_failed.draining
    assert refused.error.code.value == "POOL_UNREADY"


def test_a_failed_load_is_load_failed_and_may_load_again():
    async def scenario():
        manager = PoolManager(mock_pool(engine_options={"fail_load": "no driver"}))
        first = await manager.start()
        failed = manager.state
        manager.config = manager.config.model_copy(update={"engine_options": {}})
        second = await manager.start()
        state = manager.state
        await manager.stop()
        return first, failed, second, state

    first, failed, second, state = asyncio.run(scenario())
    assert failed is S.load_failed and not first.ready and not first.loading and "no driver" in first.last_error
    assert state is S.ready and second.ready and second.last_error is None
