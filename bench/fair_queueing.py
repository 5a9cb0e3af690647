"""Fair queueing between tenants: a light tenant's queue wait while a heavy one floods the pool.

One orchestrator app, one mock-engine pool (``--slots`` slots, a fixed ``tokens_per_s``, so
every task holds its slot for the same ``--service-ms`` of engine time; the queue is what is
measured, and a real engine would only add noise to it), a queue large enough that nobody is
refused. Two tenants, ``a`` and ``b``, each with its own API key created through
``POST /v2/keys``; both send completions through ``POST /v2/tasks`` with open-loop Poisson
arrivals (seeded, the same arrival times in every phase): ``b`` at ``--b-load`` of the pool's
nominal capacity (slots / service time), ``a`` at 10x ``b``'s rate, which alone is more than
the pool can serve.

Phases, in one run against the same app:

- b alone, then a alone (its throughput: what the pool can do);
- a + b, fair: each with its own key, so the pool's queue serves them by weighted fair
  queueing (orch/core/queue.py);
- a + b, one tenant: the same traffic without keys (both count as tenant ``default``), so
  the queue is FIFO: the baseline fair queueing is measured against.

Queue wait is the pool's own figure (the ``started`` event's ``queue_wait_ms``: from
admission to a slot). A task still queued when a phase ends (its sending window plus a short
grace) is cancelled and counted at the wait it had reached then (a lower bound, marked).
Throughput counts the tasks that started within the sending window.

Slots are not preempted, so without more a task of ``b`` that arrives while ``a`` holds every
slot would wait for one to free (every ``service / slots`` on average) however it is queued.
Declaring tenants gives the pool a reserve slot (``tenant_reserve_slots``, default 1 then) that
only a tenant with nothing running may take: ``b``'s task starts there at once. ``--reserve 0``
measures the pool without it (fair queueing alone). The mock engine runs the reserve slot's
task beside ``a``'s at full speed; a batched engine adds it to the same decode step.

    python bench/fair_queueing.py [--quick] [--seconds 60] [--slots 1] [--reserve N] [--service-ms 40] [--b-load 0.12]
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench.common as common  # noqa: E402
from bench.common import (  # noqa: E402
    banner, fmt, fmt_ratio, log, mock_pool, orchestrator, parser, percentile, print_table, ratio, write_json,
)

POOL = "fair"
TOKENS = 5          # tokens per task, evenly spread over its service time
RATE_FACTOR = 10.0  # a sends this many times b's rate
GRACE_S = 3.0       # after a phase's sending window, how long queued work may still start


@dataclass
class Task:
    tenant: str
    sent_at: float
    task_id: Optional[str] = None
    wait_ms: Optional[float] = None      # the pool's queue wait, once started
    started_at: Optional[float] = None   # client clock when the started event arrived
    censored_ms: Optional[float] = None  # still queued at the end: waited at least this long
    refused: Optional[str] = None


@dataclass
class Phase:
    name: str
    window_s: float
    tasks: list[Task] = field(default_factory=list)

    def of(self, tenant: str) -> list[Task]:
        return [t for t in self.tasks if t.tenant == tenant]

    def waits_ms(self, tenant: str) -> list[float]:
        return [t.wait_ms if t.wait_ms is not None else t.censored_ms for t in self.of(tenant)
                if t.wait_ms is not None or t.censored_ms is not None]

    def censored(self, tenant: str) -> int:
        return sum(1 for t in self.of(tenant) if t.wait_ms is None and t.censored_ms is not None)

    def started_per_s(self, tenant: str, t0: float) -> float:
        done = [t for t in self.of(tenant) if t.started_at is not None and t.started_at - t0 <= self.window_s]
        return len(done) / self.window_s


def arrivals(rate: float, seconds: float, seed: int) -> list[float]:
    """Poisson arrival offsets (s) over ``seconds``, seeded."""
    rng, at, out = random.Random(seed), 0.0, []
    while True:
        at += rng.expovariate(rate)
        if at >= seconds:
            return out
        out.append(at)


class Client:
    def __init__(self, base: str) -> None:
        import httpx

        limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
        self.http = httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(60.0, connect=10.0), limits=limits)

    async def key(self, tenant: str) -> str:
        """A new API key of ``tenant`` (admin endpoint; the loopback needs no token)."""
        answer = await self.http.post("/v2/keys", json={"tenant": tenant, "name": f"bench {tenant}",
                                                        "scopes": ["infer"]})
        if answer.status_code != 201:
            raise RuntimeError(f"POST /v2/keys for tenant {tenant}: {answer.status_code} {answer.text[:300]}")
        return answer.json()["key"]

    async def run(self, task: Task, t0: float, headers: dict[str, str], body: dict[str, Any]) -> None:
        await asyncio.sleep(max(0.0, t0 + task.sent_at - time.monotonic()))
        try:
            await self._run(task, headers, body)
        except Exception as exc:  # counted, never fatal to the run
            if task.task_id is None:
                task.refused = type(exc).__name__

    async def _run(self, task: Task, headers: dict[str, str], body: dict[str, Any]) -> None:
        answer = await self.http.post("/v2/tasks", json=body, headers=headers)
        if answer.status_code != 202:
            task.refused = f"{answer.status_code} {answer.text[:80]}"
            return
        task.task_id = answer.json()["task_id"]
        event = ""
        async with self.http.stream("GET", f"/v2/tasks/{task.task_id}/events", headers=headers) as stream:
            async for line in stream.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:].strip()
                elif line.startswith("data: ") and event == "started":
                    task.wait_ms = float(json.loads(line[6:])["queue_wait_ms"])
                    task.started_at = time.monotonic()
                    return  # the stream is detached, not the task: it runs on to its end
                elif line.startswith("data: ") and event in ("end", "error"):
                    return

    async def cancel(self, task: Task, headers: dict[str, str], gate: asyncio.Semaphore) -> None:
        async with gate:
            await self.http.post(f"/v2/tasks/{task.task_id}/cancel", headers=headers)

    async def close(self) -> None:
        await self.http.aclose()


async def run_phase(client: Client, name: str, senders: dict[str, tuple[list[float], dict[str, str]]],
                    window_s: float) -> tuple[Phase, float]:
    """Send every tenant's arrivals; cancel what has not started ``GRACE_S`` after the window."""
    phase = Phase(name, window_s)
    body = {"prompt": "Once upon a time", "max_tokens": TOKENS, "priority": "interactive",
            "placement": {"pin_pool_id": POOL}}
    headers_of: dict[int, dict[str, str]] = {}
    jobs = []
    t0 = time.monotonic() + 0.2
    for tenant, (offsets, headers) in senders.items():
        for offset in offsets:
            task = Task(tenant, offset)
            phase.tasks.append(task)
            headers_of[id(task)] = headers
            jobs.append(asyncio.ensure_future(client.run(task, t0, headers, body)))
    _, pending = await asyncio.wait(jobs, timeout=window_s + GRACE_S + 0.2)
    ended_at = time.monotonic()
    queued = [t for t in phase.tasks if t.task_id is not None and t.wait_ms is None]
    gate = asyncio.Semaphore(32)
    await asyncio.gather(*(client.cancel(t, headers_of[id(t)], gate) for t in queued), return_exceptions=True)
    for t in queued:
        t.censored_ms = (ended_at - (t0 + t.sent_at)) * 1000
    for job in pending:
        job.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    await asyncio.sleep(0.5)  # the running tasks end (a few service times) before the next phase
    return phase, t0


def p99_cell(phase: Phase, tenant: str) -> str:
    waits = phase.waits_ms(tenant)
    if not waits:
        return "-"
    value = percentile(waits, 99)
    lower_bound = phase.censored(tenant) and value >= min(t.censored_ms for t in phase.of(tenant)
                                                          if t.censored_ms is not None)
    return (">= " if lower_bound else "") + fmt(value, 0)


async def measure(base: str, args: Any) -> dict[str, Any]:
    client = Client(base)
    try:
        key_a, key_b = await client.key("a"), await client.key("b")
        service_s = args.service_ms / 1000
        capacity = args.slots / service_s  # tasks per second the pool can start
        rate_b = args.b_load * capacity
        rate_a = RATE_FACTOR * rate_b
        seconds = args.seconds
        arrive_a, arrive_b = arrivals(rate_a, seconds, 1), arrivals(rate_b, seconds, 2)
        keyed_a, keyed_b = {"Authorization": f"Bearer {key_a}"}, {"Authorization": f"Bearer {key_b}"}
        phases: dict[str, tuple[Phase, float]] = {}
        plan = [
            ("b alone", {"b": (arrive_b, keyed_b)}),
            ("a alone", {"a": (arrive_a, keyed_a)}),
            ("a + b, fair (own keys)", {"a": (arrive_a, keyed_a), "b": (arrive_b, keyed_b)}),
            ("a + b, one tenant (FIFO)", {"a": (arrive_a, {}), "b": (arrive_b, {})}),
        ]
        for name, senders in plan:
            log(f"phase {name}: {seconds:.0f}s, a {rate_a:.1f}/s, b {rate_b:.1f}/s, nominal capacity {capacity:.1f}/s")
            phases[name] = await run_phase(client, name, {k: v for k, v in senders.items() if v[0]}, seconds)
        return report(phases, capacity, args)
    finally:
        await client.close()


def report(phases: dict[str, tuple[Phase, float]], capacity: float, args: Any) -> dict[str, Any]:
    alone_b, _ = phases["b alone"]
    alone_a, t0_a = phases["a alone"]
    b_alone_p99 = percentile(alone_b.waits_ms("b"), 99) if alone_b.waits_ms("b") else float("nan")
    saturated = alone_a.started_per_s("a", t0_a)  # what the pool really starts per second, a alone flooding it
    service_ms = args.slots / saturated * 1000 if saturated else float("nan")
    rows, out = [], {}
    for name, (phase, t0) in phases.items():
        waits_b = phase.waits_ms("b")
        p99_b = percentile(waits_b, 99) if waits_b else float("nan")
        rate_a, rate_b = phase.started_per_s("a", t0), phase.started_per_s("b", t0)
        unfinished = sum(1 for t in phase.tasks if t.refused) + phase.censored("a") + phase.censored("b")
        rows.append([
            name, len(phase.of("b")) or "-", fmt(percentile(waits_b, 50), 0) if waits_b else "-",
            p99_cell(phase, "b"), fmt_ratio(ratio(p99_b, b_alone_p99)) if waits_b else "-",
            fmt(rate_a, 1) if phase.of("a") else "-", fmt_ratio(ratio(rate_a, saturated)) if phase.of("a") else "-",
            fmt_ratio(ratio(rate_a + rate_b, saturated)), unfinished,
        ])
        out[name] = {"b_tasks": len(phase.of("b")), "b_wait_ms_p50": percentile(waits_b, 50) if waits_b else None,
                     "b_wait_ms_p99": p99_b if waits_b else None, "b_censored": phase.censored("b"),
                     "a_started_per_s": rate_a, "b_started_per_s": rate_b,
                     "pool_vs_saturated": ratio(rate_a + rate_b, saturated), "unfinished": unfinished,
                     "b_waits": [[round(t.sent_at, 3), w] for t in phase.of("b")
                                 if (w := t.wait_ms if t.wait_ms is not None else t.censored_ms) is not None]}
    fair = out["a + b, fair (own keys)"]
    fifo = out["a + b, one tenant (FIFO)"]
    rate_b = args.b_load * capacity
    notes = [
        f"pool: {args.slots} slot(s), {args.service_ms:.0f} ms of engine time a task (mock engine, {TOKENS} tokens at a "
        f"fixed rate); measured with a alone flooding it: {fmt(saturated, 1)} tasks/s, {fmt(service_ms, 0)} ms a task "
        f"with the pool's own work; b sends {rate_b:.1f}/s ({ratio(rate_b, saturated):.0%} of that), a "
        f"{RATE_FACTOR:.0f}x b's rate; {args.seconds:.0f} s a phase",
        "b p99 vs alone = b's p99 queue wait / b's p99 alone (target: <= 2.000x); a vs alone = a's tasks started a "
        "second / a alone's; pool vs alone = a's + b's / a alone's (1.000x: no capacity left idle)",
        f"tenant reserve slots: {reserve_label(args)}; without one, b waits for a slot to free while a holds "
        f"them all (slots are not preempted): {fmt(service_ms / args.slots, 0)} ms apart on average, "
        f"{fmt(service_ms, 0)} ms at most; fair b p99 - b alone p99 = "
        f"{fmt((fair['b_wait_ms_p99'] or 0) - b_alone_p99, 0)} ms",
        "unfinished = refused + still queued when the phase ended (cancelled; counted at the wait reached, "
        "'>=' marks a p99 that is such a lower bound)",
    ]
    print_table("Fair queueing between tenants",
                ["phase", "b tasks", "b wait p50 ms", "b wait p99 ms", "b p99 vs alone", "a started/s",
                 "a vs alone", "pool vs alone", "unfinished"], rows, notes)
    summary = {"b_p99_fair_vs_alone": ratio(fair["b_wait_ms_p99"] or float("nan"), b_alone_p99),
               "b_p99_fifo_vs_alone": ratio(fifo["b_wait_ms_p99"] or float("nan"), b_alone_p99),
               "a_fair_vs_alone": ratio(fair["a_started_per_s"], saturated),
               "pool_fair_vs_alone": fair["pool_vs_saturated"], "service_ms": service_ms}
    print(f"\nb's p99 queue wait, fair: {fmt_ratio(summary['b_p99_fair_vs_alone'])} of alone; "
          f"one tenant (FIFO): {fmt_ratio(summary['b_p99_fifo_vs_alone'])}; "
          f"a's throughput with b, fair: {fmt_ratio(summary['a_fair_vs_alone'])} of alone; "
          f"the pool's: {fmt_ratio(summary['pool_fair_vs_alone'])}")
    return {"phases": out, "summary": summary}


def reserve_label(args: Any) -> str:
    return "1 (the default with tenants declared)" if args.reserve is None else str(args.reserve)


def with_tenants(base_config):
    """bench.common's config, plus the two declared tenants and a key store of this run."""
    store = tempfile.mkdtemp(prefix="bench-keys-")

    def config(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return base_config(*args, **kwargs) | {"tenants": {
            "declared": [{"id": "a", "weight": 1.0}, {"id": "b", "weight": 1.0}],
            "key_store": f"{store}/keys.sqlite"}}
    return config


def main() -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="sending window of each phase")
    p.add_argument("--slots", type=int, default=1, help="the pool's slots")
    p.add_argument("--reserve", type=int, default=None,
                   help="the pool's tenant_reserve_slots (default: the config's, 1 with tenants declared)")
    p.add_argument("--service-ms", type=float, default=40.0, help="how long each task holds its slot")
    p.add_argument("--b-load", type=float, default=0.12, help="b's rate as a share of the pool's capacity")
    args = p.parse_args()
    if args.quick:
        args.seconds = 5.0
    banner("fair_queueing", args.quick)
    # the first token after service/TOKENS, then one every service/TOKENS: the slot is held service_ms
    step_ms = args.service_ms / TOKENS
    pool = mock_pool(POOL, slots=args.slots, capacity=100_000, tokens_per_s=1000 / step_ms, first_token_ms=step_ms)
    if args.reserve is not None:
        pool["tenant_reserve_slots"] = args.reserve
    common.bench_server_config = with_tenants(common.bench_server_config)
    with orchestrator([pool], name="fairq", num_cpus=2, access_log=False) as orch:
        result = asyncio.run(measure(orch.base_url, args))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
