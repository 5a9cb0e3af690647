"""The ``data`` of every SSE event kind as the pool (and the ingress's stream) build it, through
the real code paths: the same keys and JSON types clients and tests/integration rely on."""

from __future__ import annotations

import asyncio

from orch.api.events import SSEEnd, SSEError, SSEMetrics, SSEStarted, SSEToken
from orch.api.pools import TaskContext
from orch.api.tasks import EmbeddingRequest, TaskRequest
from orch.pools.manager import PoolManager
from orch.serve.service import TaskStream
from tests.conftest import manager_events, mock_pool_config

STARTED_KEYS = {"queue_position", "predicted_start_ms", "queue_wait_ms", "pool_id", "engine", "engine_version",
                "prompt_tokens"}
METRICS_KEYS = {"queue_depth", "queue_position", "on_time_probability", "kv_warmth", "tokens_out", "tokens_per_s",
                "human"}


def by_kind(events, kind: str) -> list[dict]:
    return [data for _, event_kind, data in events if event_kind == kind]


async def first_token(manager: PoolManager, task_id: str) -> None:
    for _ in range(80):  # at most ~20 s
        if by_kind((await manager.poll(task_id, 0, 0.0)).events, "token"):
            return
        await asyncio.sleep(0.25)
    raise AssertionError(f"{task_id} produced no token")


def assert_ints(data: dict, *keys: str) -> None:
    for key in keys:
        assert type(data[key]) is int, (key, data[key])


def test_a_completion_streams_the_documented_payloads():
    context = TaskContext(kv_warmth=True, budgets={"tokens": 500, "time_ms": None, "cost": 1.0},
                          prices={"in": 0.5, "out": 1.0})

    async def scenario():
        manager = PoolManager(mock_pool_config("p", engine_options={"tokens_per_s": 400}))
        await manager.start()
        await manager.submit(TaskRequest(prompt="hello there", max_tokens=5, seed=7), "t1", context=context)
        events = await manager_events(manager, "t1")
        await manager.stop()
        return events

    events = asyncio.run(scenario())
    [started] = by_kind(events, "started")
    assert set(started) == STARTED_KEYS | {"seed"} and started["seed"] == 7
    assert started["pool_id"] == "p" and started["engine"] == "mock" and started["engine_version"] == "mock-1"
    assert_ints(started, "queue_position", "predicted_start_ms", "queue_wait_ms", "prompt_tokens", "seed")
    assert SSEStarted.model_validate(started).payload() == started

    tokens = by_kind(events, "token")
    assert [token["i"] for token in tokens] == list(range(5))
    assert all(set(token) == {"t", "i"} and isinstance(token["t"], str) for token in tokens)
    assert all(SSEToken.model_validate(token).payload() == token for token in tokens)

    metrics = by_kind(events, "metrics")
    assert metrics
    for frame in metrics:
        assert set(frame) == METRICS_KEYS | {"budgets"} and frame["kv_warmth"] is True
        assert frame["queue_position"] is None and frame["on_time_probability"] is None
        assert type(frame["budgets"]["tokens"]) is int and isinstance(frame["budgets"]["cost"], float)
        assert "time_ms" not in frame["budgets"]
        assert f"{frame['budgets']['tokens']} tokens of budget left" in frame["human"]

    [end] = by_kind(events, "end")
    assert events[-1][1] == "end"
    assert set(end) == {"tokens_out", "decode_time_ms", "finish_reason", "transcript_id"}
    assert end["tokens_out"] == 5 and end["finish_reason"] == "length" and end["transcript_id"]
    assert_ints(end, "tokens_out", "decode_time_ms")
    assert SSEEnd.model_validate(end).payload() == end


def test_an_embedding_ends_with_its_vectors_and_no_seed():
    async def scenario():
        manager = PoolManager(mock_pool_config("e", engine_options={"tokens_per_s": 400, "embedding_dim": 4}))
        await manager.start()
        await manager.submit(EmbeddingRequest(inputs=["a b", "c"]), "emb")
        events = await manager_events(manager, "emb")
        await manager.stop()
        return events

    events = asyncio.run(scenario())
    assert [kind for _, kind, _ in events] == ["started", "end"]
    started, end = events[0][2], events[1][2]
    assert set(started) == STARTED_KEYS
    assert set(end) == {"tokens_out", "tokens_in", "decode_time_ms", "finish_reason", "embeddings", "transcript_id"}
    assert end["tokens_out"] == 0 and end["finish_reason"] == "stop" and type(end["tokens_in"]) is int
    assert len(end["embeddings"]) == 2 and all(len(v) == 4 and type(v[0]) is float for v in end["embeddings"])


def test_cancel_and_failures_end_with_the_documented_payloads():
    async def scenario():
        manager = PoolManager(mock_pool_config("c", engine_options={"tokens_per_s": 20}, queue={"capacity": 4}))
        await manager.start()
        await manager.submit(TaskRequest(prompt="long one", max_tokens=200, seed=1), "running")
        await manager.submit(TaskRequest(prompt="queued", max_tokens=200, seed=2), "queued")
        await first_token(manager, "running")
        await manager.cancel("running")
        cancelled = await manager_events(manager, "running")
        await manager.stop()
        shut = await manager_events(manager, "queued")
        stream = TaskStream(manager_client(manager), "gone", "c", 0)
        unknown = [batch async for batch in stream.batches()]
        return cancelled, shut, unknown

    cancelled, shut, unknown = asyncio.run(scenario())
    end = cancelled[-1][2]
    assert cancelled[-1][1] == "end"
    assert set(end) == {"tokens_out", "decode_time_ms", "finish_reason", "transcript_id"}
    assert end["finish_reason"] == "cancelled" and end["tokens_out"] == len(by_kind(cancelled, "token"))
    assert_ints(end, "tokens_out", "decode_time_ms")

    error = shut[-1][2]
    assert shut[-1][1] == "error"
    assert error == {"code": "WORKER_RESET", "message": "pool is shutting down", "retriable": True,
                     "engine": "mock", "pool_id": "c", "transcript_id": error["transcript_id"]}
    assert SSEError.model_validate(error).payload() == error

    assert unknown == [[(0, "error", {"code": "NOT_FOUND", "message": "no task 'gone' in pool 'c'",
                                      "retriable": False})]]


def test_a_dropped_task_names_when_to_retry():
    async def scenario():
        manager = PoolManager(mock_pool_config("d", engine_options={"tokens_per_s": 20},
                                               queue={"capacity": 1, "policy": "drop-lru"}))
        await manager.start()
        await manager.submit(TaskRequest(prompt="runs", max_tokens=100, seed=1), "runs")
        await first_token(manager, "runs")
        await manager.submit(TaskRequest(prompt="waits", max_tokens=5, seed=2, priority="batch"), "old")
        await manager.submit(TaskRequest(prompt="newer", max_tokens=5, seed=3, priority="batch"), "new")
        dropped = await manager_events(manager, "old")
        await manager.stop()
        return dropped

    dropped = asyncio.run(scenario())
    error = dropped[-1][2]
    assert dropped[-1][1] == "error" and error["code"] == "QUEUE_FULL_DROP_LRU"
    assert set(error) == {"code", "message", "retriable", "retry_after_ms", "engine", "pool_id", "transcript_id"}
    assert error["retriable"] is True and type(error["retry_after_ms"]) is int


def test_a_metrics_frame_model_round_trips_its_payload():
    frame = SSEMetrics(queue_depth=2, queue_position=1, tokens_out=0, budgets={"tokens": 3, "cost": 0.25})
    assert frame.payload()["budgets"] == {"tokens": 3, "cost": 0.25}
    assert type(frame.payload()["budgets"]["tokens"]) is int


class manager_client:
    """The ingress's pool client, answered by one in-process PoolManager."""

    def __init__(self, manager: PoolManager) -> None:
        self.manager = manager

    async def poll(self, pool_id: str, task_id: str, cursor: int, wait_s: float, together: bool = False,
                   until_done: bool = False):
        return await self.manager.poll(task_id, cursor, wait_s, until_done)
