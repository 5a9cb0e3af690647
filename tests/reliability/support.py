"""What the reliability tests share: mock pools, actor processes, streams read by task id,
and the bookkeeping that proves no accepted task was lost or duplicated."""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import httpx
import ray

from orch.pools.actor import pool_handle
from tests.conftest import parse_sse, wait_for  # noqa: F401  (the reliability tests import them from here)

#: Restarts fast enough for a test, with the breaker out of the way.
FAST_RESTARTS = {"backoff_base_s": 0.2, "backoff_max_s": 0.5, "breaker_failures": 5, "breaker_window_s": 60,
                 "breaker_cooloff_s": 600, "healthy_after_s": 1}
TERMINAL = ("end", "error")


def mock_pool(pool_id: str, *, slots: int = 2, capacity: int = 16, policy: str = "reject", **options: Any) -> dict:
    return {"id": pool_id, "engine": "mock", "model": f"mock-{pool_id}", "num_gpus": 0, "num_cpus": 0.1,
            "allow_cpu": True, "slots": slots, "queue": {"capacity": capacity, "policy": policy},
            "engine_options": {"tokens_per_s": 200, **options}}


def rooted(config: dict, root) -> dict:
    """Keep every file the orchestrator writes under ``root`` (a test's temp dir)."""
    config = dict(config)
    config["artifacts"] = {"root": str(root / "artifacts")}
    config["catalog"] = {"root": str(root / "catalog"), "model_cache": str(root / "models"),
                         "engine_cache": str(root / "engine-cache"), "handoff_dir": str(root / "engines"),
                         "outbound": {"allow_downloads": False}}
    return config




def actor_pid(handle) -> int:
    """The process id of an actor (asked of the actor itself: works without the dashboard)."""
    return ray.get(handle.__ray_call__.remote(lambda _self: os.getpid()), timeout=10)


def pool_pid(pool_id: str, namespace: str) -> int:
    return actor_pid(pool_handle(pool_id, namespace))


def rss_bytes(pid: int) -> int:
    """Resident set size of a local process, from /proc/<pid>/status (VmRSS)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def pool_snapshot(pool_id: str, namespace: str) -> dict[str, Any]:
    """A pool's view and detail fields in one dict (the assertions read them by name)."""
    report = ray.get(pool_handle(pool_id, namespace).report.remote(), timeout=10)
    return {**vars(report.detail), **vars(report.view)}


def ingress_replicas(app: str) -> list[str]:
    """Names of the ingress replica actors of one Serve application."""
    return sorted(item["name"] for item in ray.util.list_named_actors(all_namespaces=True)
                  if item["namespace"] == "serve" and item["name"].startswith(f"SERVE_REPLICA::{app}#"))


@dataclass
class TaskLedger:
    """Every task the service accepted, with every event its streams delivered.

    ``settle`` closes the books: each accepted task must have exactly one terminal event
    (``end``, or ``error`` with a stable code), event ids must run 0..n without a gap or a
    repeat, and nothing may arrive for a task that was never accepted.
    """

    accepted: list[str] = field(default_factory=list)
    events: dict[str, list[tuple[int, str, dict]]] = field(default_factory=dict)
    broken_streams: Counter = field(default_factory=Counter)

    def accept(self, response: httpx.Response) -> Optional[str]:
        if response.status_code != 202:
            return None
        task_id = response.json()["task_id"]
        self.accepted.append(task_id)
        self.events.setdefault(task_id, [])
        return task_id

    def record(self, task_id: str, events: list[tuple[int, str, dict]]) -> None:
        self.events.setdefault(task_id, []).extend(events)

    def last_id(self, task_id: str) -> Optional[int]:
        seen = self.events.get(task_id) or []
        return seen[-1][0] if seen else None

    def finished(self, task_id: str) -> bool:
        seen = self.events.get(task_id) or []
        return bool(seen) and seen[-1][1] in TERMINAL

    def settle(self) -> dict[str, Any]:
        outcome: Counter = Counter()
        problems: list[str] = []
        if len(set(self.accepted)) != len(self.accepted):
            problems.append("a task id was accepted twice")
        for task_id in self.accepted:
            seen = self.events.get(task_id, [])
            ids = [index for index, _, _ in seen]
            terminal = [(kind, data) for _, kind, data in seen if kind in TERMINAL]
            if ids != list(range(len(ids))):
                problems.append(f"{task_id}: event ids {ids[:5]}...{ids[-5:]} are not 0..n once each")
            if len(terminal) != 1 or seen[-1][1] not in TERMINAL:
                problems.append(f"{task_id}: {len(terminal)} terminal event(s)")
                outcome["lost"] += not terminal
                continue
            kind, data = terminal[0]
            if kind == "end":
                outcome["completed"] += 1
            elif data.get("code"):
                outcome[f"failed:{data['code']}"] += 1
            else:
                problems.append(f"{task_id}: error without a code: {data}")
        strays = set(self.events) - set(self.accepted)
        if strays:
            problems.append(f"events for tasks never accepted: {sorted(strays)[:5]}")
        completed = outcome["completed"]
        failed = sum(n for key, n in outcome.items() if key.startswith("failed:"))
        return {"accepted": len(self.accepted), "completed": completed, "failed_typed": failed,
                "lost": outcome["lost"], "outcomes": dict(outcome), "problems": problems,
                "broken_streams": dict(self.broken_streams)}

    def assert_all_accounted(self) -> dict[str, Any]:
        books = self.settle()
        assert not books["problems"], books["problems"][:10]
        assert books["accepted"] == books["completed"] + books["failed_typed"], books
        assert books["lost"] == 0, books
        return books


def follow(client: httpx.Client, ledger: TaskLedger, task_id: str, *, attempts: int = 5,
           read_timeout_s: float = 30.0, budget_s: float = 60.0) -> None:
    """Read a task's stream to its terminal event, resuming with Last-Event-ID when the
    connection breaks (an ingress replica died): no event is read twice or skipped."""
    deadline = time.monotonic() + budget_s
    for _ in range(attempts):
        if ledger.finished(task_id) or time.monotonic() > deadline:
            return
        last = ledger.last_id(task_id)
        headers = {"Last-Event-ID": str(last)} if last is not None else {}
        lines: list[str] = []
        complete = False
        try:
            with client.stream("GET", f"/v2/tasks/{task_id}/events", headers=headers,
                               timeout=httpx.Timeout(10.0, read=read_timeout_s)) as response:
                if response.status_code != 200:
                    ledger.broken_streams[f"http {response.status_code}"] += 1
                    time.sleep(0.2)
                    continue
                for line in response.iter_lines():
                    lines.append(line)
                    if time.monotonic() > deadline:
                        break
                else:
                    complete = True
        except httpx.HTTPError as exc:
            ledger.broken_streams[type(exc).__name__] += 1
        # An event cut off mid-way (no blank line yet) is dropped and read again on resume.
        ledger.record(task_id, parse_sse(lines + ([""] if complete else [])))


def _task_state_in_process(actor) -> dict[str, int]:
    import gc

    from orch.pools.task_record import TaskRecord

    gc.collect()
    return {"records_alive": sum(1 for obj in gc.get_objects() if isinstance(obj, TaskRecord)),
            "tasks_kept": len(actor.manager.tasks), "python_objects": len(gc.get_objects())}


def pool_task_state(pool_id: str, namespace: str) -> dict[str, int]:
    """Task records still alive in a pool's process after a full garbage collection."""
    return ray.get(pool_handle(pool_id, namespace).__ray_call__.remote(_task_state_in_process), timeout=30)
