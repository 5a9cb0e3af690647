"""A request's hop marks and its first-token split (orch/observability/trace.py), through the
real ingress app and a real pool in this process (no Ray, no HTTP sockets)."""

from __future__ import annotations

import asyncio
import json
import tempfile

import httpx

from orch.api.pools import TaskMarks
from orch.config import parse_config
from orch.observability.exposition import render
from orch.observability.ingress_metrics import merge
from orch.observability.trace import RequestTrace, Traces
from orch.pools.core import first_token_marks
from orch.pools.manager import PoolManager
from orch.pools.task_record import TaskRecord
from orch.serve.app import build_app
from orch.serve.registry import PoolRegistry
from orch.serve.state import IngressState

MARKS = ("received_at", "parsed_at", "placed_at", "pool_admitted_at", "pool_started_at", "pool_first_token_at", "pool_sent_at",
         "page_received_at", "relayed_at")


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        result = self.fn(*args, **kwargs)
        if asyncio.iscoroutine(result):
            return result

        async def done():
            return result

        return done()


class _Handle:
    """A pool actor's handle over a PoolManager in this process."""

    def __init__(self, manager: PoolManager) -> None:
        self.manager = manager

    def __getattr__(self, name: str) -> _Method:
        return _Method(getattr(self.manager, name))


async def _ingress(tokens_per_s: float):
    config = parse_config({
        "namespace": "trace-test", "artifacts": {"root": tempfile.mkdtemp(prefix="trace-art-")},
        "pools": [{"id": "m", "engine": "mock", "model": "mock-model", "num_gpus": 0, "num_cpus": 0,
                   "allow_cpu": True, "slots": 1, "engine_options": {"tokens_per_s": tokens_per_s}}],
    }, "trace test")
    manager = PoolManager(config.pools[0])
    await manager.start()
    state = IngressState(config=config, registry=PoolRegistry(config, {"m": _Handle(manager)},
                                                               config.server.snapshot_ttl_s, nudge_supervisor=False))
    return build_app(state), state, manager


def test_a_v2_task_leaves_ordered_marks_and_a_split_that_adds_up():
    async def scenario():
        app, state, manager = await _ingress(tokens_per_s=200)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
                posted = await c.post("/v2/tasks", json={"prompt": "hi", "max_tokens": 3, "seed": 1})
                task_id = posted.json()["task_id"]
                events = await c.get(f"/v2/tasks/{task_id}/events")
                trace = await c.get(f"/v2/tasks/{task_id}/trace")
                missing = await c.get("/v2/tasks/nope/trace")
            return posted, events, trace.json(), missing, state.counters.take_deltas()
        finally:
            await manager.stop()

    posted, events, trace, missing, deltas = asyncio.run(scenario())
    assert posted.status_code == 202 and events.status_code == 200 and "event: token" in events.text
    marks = trace["marks"]
    times = [marks[name] for name in MARKS]
    assert times == sorted(times), marks
    assert marks["stream_received_at"] is not None and marks["admitted_at"] <= marks["stream_received_at"]
    split = trace["split_ms"]
    assert set(split) == {"orchestrator", "queue", "engine"} and min(split.values()) >= 0
    engine_ms = (marks["pool_first_token_at"] - marks["pool_started_at"]) * 1000
    assert abs(split["engine"] - engine_ms) < 1e-6
    assert missing.status_code == 404 and missing.json()["code"] == "NOT_FOUND"
    # The split went into this replica's counters: one observation per part.
    assert {part: sum(h["counts"]) for part, h in deltas["split"].items()} == {
        "orchestrator": 1, "queue": 1, "engine": 1}
    text = render({}, {}, merge({}, deltas)).decode()
    assert 'latency_first_token_split_ms_count{part="engine"} 1.0' in text


def test_an_openai_stream_is_traced_from_its_one_request():
    async def scenario():
        app, state, manager = await _ingress(tokens_per_s=200)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
                answer = await c.post("/v1/completions", json={"model": "mock-model", "prompt": "hi", "max_tokens": 3,
                                                               "stream": True})
                first = json.loads(answer.text.split("data: ", 2)[1].split("\n")[0])
                task_id = first["id"].removeprefix("cmpl-")
                return answer, (await c.get(f"/v2/tasks/{task_id}/trace")).json()
        finally:
            await manager.stop()

    answer, trace = asyncio.run(scenario())
    assert answer.status_code == 200
    marks = trace["marks"]
    assert marks["stream_received_at"] is None  # the admitting request streamed it
    assert [marks[name] for name in MARKS] == sorted(marks[name] for name in MARKS)
    assert trace["split_ms"]["orchestrator"] >= 0


def test_the_split_does_not_charge_a_late_get_to_the_orchestrator():
    pool = TaskMarks(admitted_at=10.0, started_at=10.001, first_token_at=10.021, sent_at=10.0215)
    prompt = RequestTrace("t", received_at=9.999, placed_at=9.9995, admitted_at=10.002, stream_received_at=10.003,
                          pool=pool, page_received_at=10.022, relayed_at=10.023)
    assert round(prompt.split_ms()["orchestrator"], 3) == 3.0  # (10.023 - 9.999) - (10.021 - 10.0)
    late = RequestTrace("t", received_at=9.999, admitted_at=10.002, stream_received_at=12.0, pool=pool,
                        page_received_at=12.001, relayed_at=12.002)
    assert round(late.split_ms()["orchestrator"], 3) == 2.0  # counted from the GET
    assert RequestTrace("t", received_at=1.0).split_ms() is None


def test_traces_keep_the_newest_only():
    traces = Traces(capacity=2)
    for name in ("a", "b", "c"):
        traces.add(RequestTrace(name, received_at=0.0))
    assert traces.get("a") is None and traces.get("c") is not None


def test_pool_marks_ride_only_on_the_page_with_the_first_token():
    record = TaskRecord(task_id="t", priority="interactive", prompt="p", params=None, ctx=8, prompt_tokens=1,
                        queue_position=0, predicted_start_ms=0)
    assert first_token_marks(record, [(0, "started", {})]) is None
    record.started_at = record.first_token_at = record.admitted_at + 0.01
    assert first_token_marks(record, [(0, "started", {}), (1, "metrics", {})]) is None
    marks = first_token_marks(record, [(1, "metrics", {}), (2, "token", {"t": "a", "i": 0})])
    assert marks is not None and marks.first_token_at == record.first_token_at
    assert first_token_marks(record, [(3, "token", {"t": "b", "i": 1})]) is None


def test_a_pool_that_came_back_since_the_cached_views_is_not_refused():
    """Placement reads views without waiting while they are young; a refusal from views older
    than the ttl (a pool shown down that is Ready again) is checked against fresh views."""
    import time
    from dataclasses import replace

    async def scenario():
        app, state, manager = await _ingress(tokens_per_s=200)
        registry = state.registry
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
                await registry.rows()  # taken now: the pool is Ready
                registry._rows = {"m": replace(registry._rows["m"], ready=False)}  # as seen before it came back
                registry._views = list(registry._rows.values())
                registry._taken_at = time.monotonic() - registry.ttl_s - 0.05
                answer = await c.post("/v2/tasks", json={"prompt": "hi", "max_tokens": 1, "seed": 1,
                                                         "placement": {"pin_pool_id": "m"}})
            return answer
        finally:
            await manager.stop()

    answer = asyncio.run(scenario())
    assert answer.status_code == 202, answer.text
