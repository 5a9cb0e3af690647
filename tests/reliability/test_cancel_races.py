"""Cancel at random moments: queued, just dispatched, mid-stream, after the end.

In process, on ``PoolManager`` with the mock engine (no Ray), so ten thousand cancels fit
in CI's time; a smaller run goes through the real HTTP stack. What every run checks:

- no token reaches a stream after cancel returned, and ``X-Tokens-Sent`` / ``tokens_sent``
  is exactly what the stream wrote;
- each admitted task shows exactly one terminal event, ids contiguous, and leaves exactly
  one transcript;
- no slot leaks: the pool returns to its full slot count with an empty queue;
- the counters add up: every enqueued task is counted once as completed, cancelled,
  failed, dropped or purged.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orch.api.tasks import TaskRequest
from orch.config import PoolConfig
from orch.engines.base import EngineError
from orch.engines.mock import MockEngine
from orch.pools.manager import PoolManager

#: Cancels in the in-process stress run (ORCH_CANCEL_STRESS overrides it).
STRESS_CANCELS = int(os.environ.get("ORCH_CANCEL_STRESS", "10000"))
#: Outcome counters whose sum must equal the enqueued count once every task has ended.
OUTCOMES = ("completed", "cancelled", "failed", "dropped", "purged")
MOMENTS = ("queued", "dispatched", "mid_stream", "after_end")


def mock_pool(slots: int, capacity: int, policy: str = "reject", tokens_per_s: float = 4000.0) -> PoolConfig:
    return PoolConfig.model_validate({
        "id": "race", "engine": "mock", "model": "mock-race", "num_gpus": 0, "num_cpus": 0, "allow_cpu": True,
        "slots": slots, "queue": {"capacity": capacity, "policy": policy},
        "engine_options": {"tokens_per_s": tokens_per_s}, "retain_finished_s": 600,
    })


def task(max_tokens: int, priority: str = "interactive", prompt: str = "race the cancel") -> TaskRequest:
    return TaskRequest(prompt=prompt, max_tokens=max_tokens, priority=priority, seed=7)


@dataclass
class Stream:
    """What one consumer wrote to its client, and when."""

    events: list[tuple[int, str, dict]] = field(default_factory=list)
    #: Tokens handed out by a poll that began after cancel returned: never allowed.
    tokens_handed_after_cancel: int = 0
    #: Tokens written after cancel returned, from a batch handed out before it: allowed only
    #: when cancel found the task already over (its own end, not a cancelled one).
    tokens_written_after_cancel: int = 0
    done: bool = False


@dataclass
class Harness:
    manager: PoolManager
    transcripts: Counter = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)

    @classmethod
    async def start(cls, config: PoolConfig, engine_factory=None) -> "Harness":
        harness = cls(PoolManager(config, engine_factory) if engine_factory else PoolManager(config))

        async def count_transcript(summary: dict[str, Any]) -> None:
            harness.transcripts[summary["task_id"]] += 1

        harness.manager.finish_listeners.append(count_transcript)
        await harness.manager.start()
        assert harness.manager.ready, harness.manager.last_error
        return harness

    async def consume(self, task_id: str, stream: Stream, cancel_returned: asyncio.Event, pace_s: float) -> None:
        """Poll like the ingress does; a write to the client takes ``pace_s``."""
        cursor = 0
        for _ in range(100_000):
            began_after_cancel = cancel_returned.is_set()
            result = await self.manager.poll(task_id, cursor, 0.2)
            if result.error is not None:
                self.violations.append(f"{task_id}: poll failed: {result.error}")
                return
            events = result.events
            if pace_s:
                await asyncio.sleep(pace_s)
            tokens = sum(1 for _, kind, _ in events if kind == "token")
            if began_after_cancel:
                stream.tokens_handed_after_cancel += tokens
            elif cancel_returned.is_set():
                stream.tokens_written_after_cancel += tokens
            stream.events.extend(events)
            if events:
                cursor = events[-1][0] + 1
            if result.done:
                stream.done = True
                return
        self.violations.append(f"{task_id}: stream did not end")

    def check_stream(self, task_id: str, stream: Stream, cancel: Optional[dict[str, Any]]) -> None:
        events = stream.events
        ids = [index for index, _, _ in events]
        kinds = [kind for _, kind, _ in events]
        tokens = [data for _, kind, data in events if kind == "token"]
        terminal = [kind for kind in kinds if kind in ("end", "error")]
        problems = []
        if not stream.done:
            problems.append("not done")
        if ids != list(range(len(ids))):
            problems.append(f"event ids not contiguous: {ids}")
        if len(terminal) != 1 or kinds[-1] not in ("end", "error"):
            problems.append(f"terminal events {terminal}, last {kinds[-1:]}")
        if [data["i"] for data in tokens] != list(range(len(tokens))):
            problems.append("token indexes not contiguous")
        cancelled = bool(events) and events[-1][2].get("finish_reason") == "cancelled"
        if stream.tokens_handed_after_cancel:
            problems.append(f"{stream.tokens_handed_after_cancel} token(s) handed out after cancel returned")
        if stream.tokens_written_after_cancel and (cancel is None or cancelled):
            problems.append(f"{stream.tokens_written_after_cancel} token(s) written after a cancel that "
                            f"took effect returned (cancel: {cancel})")
        if cancel is not None:
            if not cancel["found"]:
                problems.append("cancel did not find the task")
            elif cancel["tokens_sent"] != len(tokens):
                problems.append(f"cancel said {cancel['tokens_sent']} tokens sent, the stream wrote {len(tokens)}")
            if not cancel.get("acknowledged", True):
                problems.append("cancel returned before the stream acknowledged")
        if kinds and kinds[-1] == "end" and events[-1][2].get("tokens_out") != len(tokens):
            problems.append(f"end says {events[-1][2].get('tokens_out')} tokens, the stream wrote {len(tokens)}")
        if problems:
            self.violations.append(f"{task_id}: " + "; ".join(problems))

    async def settle(self, timeout_s: float = 10.0) -> None:
        """Wait until no slot is busy, nothing is queued and every finish was delivered."""
        manager = self.manager
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            idle = manager.active_slots == 0 and len(manager.queue) == 0
            if idle and all(r.terminal for r in manager.tasks.values()) and manager._finished.empty():
                await asyncio.sleep(0.05)  # let the deliverer run the listeners of the last finish
                return
            await asyncio.sleep(0.01)

    def check_pool(self, admitted: set[str]) -> None:
        manager = self.manager
        slots = manager.config.slots
        if manager.active_slots != 0 or sorted(manager._free_slots) != list(range(slots)):
            self.violations.append(f"slots leaked: active {manager.active_slots}, free {sorted(manager._free_slots)}")
        if len(manager.queue):
            self.violations.append(f"{len(manager.queue)} task(s) stuck in the queue")
        counters = manager.counters
        if counters["enqueued"] != len(admitted):
            self.violations.append(f"enqueued counter {counters['enqueued']} != {len(admitted)} admitted")
        outcomes = sum(counters[name] for name in OUTCOMES)
        if outcomes != counters["enqueued"]:
            self.violations.append(
                f"counters do not add up: enqueued {counters['enqueued']} != "
                + " + ".join(f"{name} {counters[name]}" for name in OUTCOMES) + f" = {outcomes}")
        twice = {tid: n for tid, n in self.transcripts.items() if n != 1}
        missing = admitted - set(self.transcripts)
        if twice:
            self.violations.append(f"{len(twice)} task(s) left more than one transcript, e.g. {sorted(twice.items())[:3]}")
        if missing:
            self.violations.append(f"{len(missing)} task(s) left no transcript, e.g. {sorted(missing)[:3]}")


def moment_of(manager: PoolManager, task_id: str) -> str:
    record = manager.tasks[task_id]
    if record.terminal:
        return "after_end"
    if record.state == "queued":
        return "queued"
    return "dispatched" if record.tokens_out == 0 else "mid_stream"


async def wait_for_moment(manager: PoolManager, task_id: str, moment: str, rng: random.Random) -> None:
    """Aim the cancel at one moment of the task's life (bounded: it may pass by)."""
    record = manager.tasks[task_id]
    deadline = time.monotonic() + 2.0
    if moment == "queued":
        return
    while time.monotonic() < deadline:
        if moment == "dispatched" and record.state != "queued":
            return
        if moment == "mid_stream" and (record.tokens_out >= rng.randint(1, 4) or record.terminal):
            return
        if moment == "after_end" and record.terminal:
            return
        await asyncio.sleep(0.0002)


# --------------------------------------------------------------------------- stress


async def stress(cancels: int, seed: int, concurrency: int = 32) -> dict[str, Any]:
    rng = random.Random(seed)
    harness = await Harness.start(mock_pool(slots=4, capacity=32))
    manager = harness.manager
    admitted: set[str] = set()
    aimed: Counter = Counter()
    landed: Counter = Counter()
    refused = 0
    next_index = itertools.count()
    done = 0
    latencies: list[float] = []

    async def episode(index: int) -> None:
        nonlocal refused, done
        task_id = f"s{index}"
        answer = await manager.submit(task(rng.randint(1, 40)), task_id)
        if answer.error is not None:
            refused += 1
            await asyncio.sleep(0.002)
            return
        admitted.add(task_id)
        stream = Stream()
        cancel_returned = asyncio.Event()
        pace = rng.choice((0.0, 0.0, 0.0005, 0.002))
        consumer = None
        if rng.random() < 0.9:  # now and then nobody is reading when the cancel comes
            consumer = asyncio.create_task(harness.consume(task_id, stream, cancel_returned, pace))
        moment = rng.choice(MOMENTS)
        aimed[moment] += 1
        await wait_for_moment(manager, task_id, moment, rng)
        landed[moment_of(manager, task_id)] += 1
        started = time.perf_counter()
        result = await manager.cancel(task_id)
        latencies.append(time.perf_counter() - started)
        cancel_returned.set()
        done += 1
        if consumer is None:
            consumer = asyncio.create_task(harness.consume(task_id, stream, cancel_returned, pace))
        await asyncio.wait_for(consumer, 10)
        harness.check_stream(task_id, stream, result.to_dict())

    async def lane() -> None:
        while done < cancels:
            await episode(next(next_index))

    began = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    await harness.settle()
    harness.check_pool(admitted)
    await manager.stop()
    latencies.sort()
    return {
        "cancels": done, "admitted": len(admitted), "refused_queue_full": refused, "seconds": round(elapsed, 1),
        "aimed": dict(aimed), "landed": dict(landed), "counters": dict(manager.counters),
        "cancel_p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
        "cancel_p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
        "violations": harness.violations,
    }


def test_ten_thousand_cancels_at_random_moments():
    report = asyncio.run(stress(STRESS_CANCELS, seed=20240608))
    print("cancel stress:", {k: v for k, v in report.items() if k != "violations"})
    assert report["cancels"] >= STRESS_CANCELS
    assert all(report["landed"].get(moment, 0) > 0 for moment in MOMENTS), report["landed"]
    assert not report["violations"], f"{len(report['violations'])} violation(s): {report['violations'][:10]}"


# --------------------------------------------------------------------------- properties


task_plan = st.fixed_dictionaries({
    "max_tokens": st.integers(min_value=1, max_value=30),
    "priority": st.sampled_from(("interactive", "batch")),
    "fault": st.sampled_from((None, None, None, "error_midway", "error_at_start")),
    "cancel_after_s": st.one_of(st.none(), st.floats(min_value=0, max_value=0.02)),
    "reader": st.sampled_from(("none", "fast", "slow")),
    "submit_gap_s": st.floats(min_value=0, max_value=0.003),
})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    plans=st.lists(task_plan, min_size=1, max_size=10),
    slots=st.integers(min_value=1, max_value=3),
    capacity=st.integers(min_value=1, max_value=4),
    policy=st.sampled_from(("reject", "drop-lru")),
)
def test_any_mix_of_tasks_and_cancels_keeps_the_pool_consistent(plans, slots, capacity, policy):
    """Whatever arrives and whenever it is cancelled, every admitted task ends exactly once
    and visibly, no token follows a returned cancel, and slots and counters come back."""

    async def scenario() -> list[str]:
        harness = await Harness.start(mock_pool(slots=slots, capacity=capacity, policy=policy, tokens_per_s=2000))
        manager = harness.manager
        admitted: set[str] = set()

        async def run(index: int, plan: dict[str, Any]) -> None:
            await asyncio.sleep(index * plan["submit_gap_s"])
            task_id = f"p{index}"
            prompt = "race the cancel"
            if plan["fault"] == "error_midway":
                prompt += f" @fault=error:{plan['max_tokens'] // 2}"
            elif plan["fault"] == "error_at_start":
                prompt += " @fault=error"
            answer = await manager.submit(task(plan["max_tokens"], plan["priority"], prompt), task_id)
            if answer.error is not None:
                assert answer.error.code == "ADMISSION_REJECT", answer
                return
            admitted.add(task_id)
            stream, cancel_returned = Stream(), asyncio.Event()
            consumer = None
            if plan["reader"] != "none":
                pace = 0.0 if plan["reader"] == "fast" else 0.004
                consumer = asyncio.create_task(harness.consume(task_id, stream, cancel_returned, pace))
            result = None
            if plan["cancel_after_s"] is not None:
                await asyncio.sleep(plan["cancel_after_s"])
                result = await manager.cancel(task_id)
                cancel_returned.set()
            if consumer is None:
                consumer = asyncio.create_task(harness.consume(task_id, stream, cancel_returned, 0.0))
            await asyncio.wait_for(consumer, 10)
            harness.check_stream(task_id, stream, result.to_dict() if result is not None else None)

        await asyncio.gather(*(run(index, plan) for index, plan in enumerate(plans)))
        await harness.settle()
        harness.check_pool(admitted)
        await manager.stop()
        return harness.violations

    violations = asyncio.run(scenario())
    assert not violations, violations


# --------------------------------------------------------------------------- over HTTP


#: Cancels in the run over the real HTTP stack (Serve proxy, ingress, pool actor).
HTTP_CANCELS = int(os.environ.get("ORCH_HTTP_CANCELS", "200"))


@pytest.fixture(scope="module")
def http_service(deploy, tmp_path_factory):
    from tests.reliability.support import mock_pool, rooted

    config = rooted({"version": 1, "pools": [mock_pool("race", slots=4, capacity=64, tokens_per_s=300)]},
                    tmp_path_factory.mktemp("cancel-http"))
    client = deploy(config, name="orch-rel-cancel", route_prefix="/rcancel")
    return client, "orch-rel-cancel"


async def http_episode(client, rng: random.Random, index: int, figures: Counter, violations: list[str]) -> None:
    from tests.reliability.support import parse_sse

    moment = rng.choice(MOMENTS)
    reader_attached = rng.random() < 0.85
    admitted = await client.post("/v2/tasks", json={"prompt": "race over http", "max_tokens": rng.randint(1, 60),
                                                    "seed": index})
    if admitted.status_code != 202:
        figures["refused"] += 1
        return
    task_id = admitted.json()["task_id"]
    lines: list[str] = []
    started, tokens_seen, ended = asyncio.Event(), asyncio.Event(), asyncio.Event()
    wanted_tokens = rng.randint(1, 4)

    async def read() -> None:
        async with client.stream("GET", f"/v2/tasks/{task_id}/events") as response:
            async for line in response.aiter_lines():
                lines.append(line)
                if line.startswith("event: started"):
                    started.set()
                elif line.startswith("event: token") and sum(1 for l in lines if l == "event: token") >= wanted_tokens:
                    tokens_seen.set()
                elif line.startswith(("event: end", "event: error")):
                    ended.set()
        started.set(), tokens_seen.set(), ended.set()

    reader = asyncio.create_task(read()) if reader_attached else None
    if reader is not None:
        aim = {"queued": None, "dispatched": started, "mid_stream": tokens_seen, "after_end": ended}[moment]
        if aim is not None:
            await asyncio.wait_for(aim.wait(), 30)
    elif moment != "queued":
        await asyncio.sleep(0.4)  # nobody reads: the task may run to its end meanwhile
    figures[f"{moment}{'' if reader_attached else ' (no reader)'}"] += 1
    cancelled = await client.post(f"/v2/tasks/{task_id}/cancel")
    if cancelled.status_code != 204:
        violations.append(f"{task_id}: cancel answered {cancelled.status_code} {cancelled.text[:200]}")
        return
    tokens_sent = int(cancelled.headers["X-Tokens-Sent"])
    if reader is None:
        reader = asyncio.create_task(read())
    await asyncio.wait_for(reader, 30)
    events = parse_sse(lines + [""])
    tokens = [data for _, kind, data in events if kind == "token"]
    terminal = [kind for _, kind, _ in events if kind in ("end", "error")]
    if len(tokens) != tokens_sent:
        violations.append(f"{task_id}: X-Tokens-Sent {tokens_sent}, the stream carried {len(tokens)} ({moment})")
    if terminal != ["end"] or [index for index, _, _ in events] != list(range(len(events))):
        violations.append(f"{task_id}: events {[kind for _, kind, _ in events]}")
    figures["finish:" + events[-1][2].get("finish_reason", "?")] += 1


@pytest.mark.integration
def test_cancels_over_http_at_random_moments(http_service):
    from tests.reliability.support import pool_snapshot, wait_for

    client, namespace = http_service
    rng = random.Random(31)
    figures: Counter = Counter()
    violations: list[str] = []

    async def run() -> float:
        import httpx

        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=60) as http:
            gate = asyncio.Semaphore(8)

            async def bounded(index: int) -> None:
                async with gate:
                    await http_episode(http, rng, index, figures, violations)

            began = time.perf_counter()
            await asyncio.gather(*(bounded(index) for index in range(HTTP_CANCELS)))
            return time.perf_counter() - began

    elapsed = asyncio.run(run())
    snapshot = wait_for(lambda: (s := pool_snapshot("race", namespace))["active_slots"] == 0
                        and s["queue_depth"] == 0 and s, 15)
    counters = snapshot["counters"]
    print(f"http cancels: {HTTP_CANCELS} in {elapsed:.1f} s, {dict(figures)}, counters {counters}")
    assert not violations, violations[:10]
    outcomes = sum(counters[name] for name in OUTCOMES)
    assert outcomes == counters["enqueued"], counters


# --------------------------------------------------------------------------- one exact interleaving


def test_a_token_racing_the_cut_cannot_follow_the_cancel():
    """The engine thread checks ``cancelled`` and then appends its token; cancel cuts and then
    appends its ``end``. Forced here: the engine's check passes before the cut and its append
    lands between the cut and the end. That token must not reach the stream after cancel
    returned, and the end's tokens_out must count what the stream carries."""
    from orch.pools.task_record import TaskRecord

    async def scenario() -> tuple[list, int]:
        record = TaskRecord(task_id="t", priority="interactive", prompt="p", params=None, ctx=64, prompt_tokens=1,
                            queue_position=0, predicted_start_ms=0)
        record.bind_loop(asyncio.get_running_loop())
        record.push("started", {})
        record.push_token("first")
        handed, _ = await record.poll(0, 0.0)  # a stream holds started + first
        engine_checked, may_append, appended = threading.Event(), threading.Event(), threading.Event()
        push = record.push

        def paced_push(kind: str, data: dict, *args, **kwargs) -> bool:
            if kind == "token" and threading.current_thread() is engine:
                engine_checked.set()
                may_append.wait(5)
                try:
                    return push(kind, data, *args, **kwargs)
                finally:
                    appended.set()
            if kind == "end" and engine_checked.is_set() and not may_append.is_set():
                may_append.set()
                appended.wait(5)
            return push(kind, data, *args, **kwargs)

        record.push = paced_push
        engine = threading.Thread(target=record.push_token, args=("late",))
        engine.start()
        if not engine_checked.wait(1):  # the token is checked and appended in one step: no window
            engine.join(5)
        cut = record.cut_and_end(decode_time_ms=0)
        consumer = asyncio.create_task(record.poll(len(handed), 1.0))  # acknowledges the first batch
        assert await record.wait_acknowledged(cut, 2.0)
        engine.join(5)
        after_cancel, _ = await consumer
        return handed + after_cancel, record.tokens_before(cut)

    written, tokens_sent = asyncio.run(scenario())
    tokens = [data["t"] for _, kind, data in written if kind == "token"]
    end = written[-1][2]
    assert tokens == ["first"] == tokens[:tokens_sent], written
    assert end.get("tokens_out") == len(tokens), written


class FailsAfterOneToken(MockEngine):
    """Emits one token, then fails 50 ms later without emitting again: a cancel in between
    is seen by the slot only through the failure."""

    def generate(self, slot, prompt, params, emit):
        emit(" one")
        time.sleep(0.05)
        raise EngineError("engine failed after its first token")


@pytest.mark.parametrize("ending", ["engine_error", "deadline"])
def test_a_task_cancelled_while_its_engine_fails_is_counted_once(ending):
    """Cancel lands first; then the engine raises (or the deadline passes) before the slot
    notices. The task ended cancelled, so it counts as cancelled only."""

    async def scenario() -> dict[str, int]:
        if ending == "engine_error":
            harness = await Harness.start(mock_pool(slots=1, capacity=2),
                                          engine_factory=lambda config, *_: FailsAfterOneToken(slots=1))
            request = task(5)
        else:
            harness = await Harness.start(mock_pool(slots=1, capacity=2, tokens_per_s=20))
            request = TaskRequest(prompt="slow", max_tokens=5, seed=7, deadline_ms=30)
        manager = harness.manager
        await manager.submit(request, "victim")
        record = manager.tasks["victim"]
        for _ in range(200):
            if record.tokens_out:
                break
            await asyncio.sleep(0.002)
        assert not record.terminal
        await manager.cancel("victim")
        await harness.settle()
        harness.check_pool({"victim"})
        await manager.stop()
        assert not harness.violations, harness.violations
        return dict(manager.counters)

    counters = asyncio.run(scenario())
    assert counters["cancelled"] == 1 and counters["failed"] == 0, counters
