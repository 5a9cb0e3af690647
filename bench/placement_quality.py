"""Placement quality on simulated mixed pools, no Ray.

Several in-process ``orch.pools.manager.PoolManager``s with mock engines of different
speeds (``tokens_per_s``, ``first_token_ms``) and different simulated VRAM sizes take a
mixed interactive/batch load with deadlines. Policies compared on the same arrival
sequence, all running at the same time in one event loop (each on its own set of pools),
so machine noise hits them alike:

- orchestrator: ``orch.core.placement.place`` over the views of a ``PoolRegistry`` whose
  snapshot calls go to the in-process managers instead of Ray actors: the registry's own
  TTL cache (``snapshot_ttl_s``) and its ``note_admitted`` accounting are reused as is;
- round-robin, random (seeded): the baselines;
- what-if policies, NOT in the orchestrator, to show what a ranking change would give:
  least-work (the orchestrator's second key alone: (active + queued) / slots) and
  expected-wait (queued work x the pool's measured service time, + its first-token time).

VRAM: the mock engine reports ``vram_free_bytes: 0``, so the registry rows get fake totals
here: free = total - weights - active_slots x KV cost per slot (refreshed with the cached
snapshot, like real VRAM readings would be).

TTFT counts from the task's arrival (placement + submit included) to its first token; a
task that never got a token (its deadline passed in the queue, or the run's time ran out)
counts as infinitely late. Deadline hit = ``end`` arrived within the deadline.

    python bench/placement_quality.py [--quick] [--scenario big-slow,big-fast] [--seconds 30]
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import banner, fmt_ratio, log, parser, percentile, print_table, ratio, write_json  # noqa: E402

GiB = 1024**3
WEIGHTS = 8 * GiB
KV_PER_SLOT = 2 * GiB
TTL_S = 0.25  # ServerConfig.snapshot_ttl_s default


@dataclass(frozen=True)
class PoolSpec:
    id: str
    vram_gib: int
    slots: int
    tokens_per_s: float
    first_token_ms: float


SCENARIOS: dict[str, list[PoolSpec]] = {
    # Big-memory cards are the slow ones (older generation): VRAM and speed anti-correlated.
    "big-slow": [
        PoolSpec("big-slow-a", 80, 4, 20, 120), PoolSpec("big-slow-b", 80, 4, 20, 120),
        PoolSpec("mid", 48, 4, 40, 60),
        PoolSpec("fast-a", 24, 4, 80, 25), PoolSpec("fast-b", 24, 4, 80, 25),
    ],
    # The same pools with the VRAM sizes swapped: the big cards are the fast ones.
    "big-fast": [
        PoolSpec("slow-a", 24, 4, 20, 120), PoolSpec("slow-b", 24, 4, 20, 120),
        PoolSpec("mid", 48, 4, 40, 60),
        PoolSpec("big-fast-a", 80, 4, 80, 25), PoolSpec("big-fast-b", 80, 4, 80, 25),
    ],
}

INTERACTIVE = {"priority": "interactive", "max_tokens": 24, "deadline_ms": 2500}
BATCH = {"priority": "batch", "max_tokens": 96, "deadline_ms": 15000}
INTERACTIVE_SHARE = 0.7


@dataclass
class Arrival:
    at_s: float
    kind: dict[str, Any]
    seed: int


def arrivals(rate: float, seconds: float, seed: int) -> list[Arrival]:
    rng = random.Random(seed)
    out, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            return out
        out.append(Arrival(t, INTERACTIVE if rng.random() < INTERACTIVE_SHARE else BATCH, rng.randrange(2**31)))


def capacity_tasks_per_s(specs: list[PoolSpec]) -> float:
    total = 0.0
    for s in specs:
        mean = sum(share * (s.first_token_ms / 1000 + kind["max_tokens"] / s.tokens_per_s)
                   for share, kind in ((INTERACTIVE_SHARE, INTERACTIVE), (1 - INTERACTIVE_SHARE, BATCH)))
        total += s.slots / mean
    return total


@dataclass
class Outcome:
    kind: str
    pool: str
    ttft_s: float = math.inf
    hit: bool = False
    rejected: bool = False


@dataclass
class PolicyRun:
    name: str
    outcomes: list[Outcome] = field(default_factory=list)


def build(specs: list[PoolSpec]):
    from orch.config import parse_config
    from orch.pools.manager import PoolManager

    config = parse_config({
        "version": 1,
        "namespace": "bench-placement",
        "server": {"snapshot_ttl_s": TTL_S},
        "pools": [{
            "id": s.id, "engine": "mock", "model": "mock-model", "num_gpus": 0, "allow_cpu": True, "slots": s.slots,
            "queue": {"capacity": 100_000, "policy": "reject"}, "retain_finished_s": 600,
            "engine_options": {"tokens_per_s": s.tokens_per_s, "first_token_ms": s.first_token_ms},
        } for s in specs],
    }, "placement bench")
    managers = {pool.id: PoolManager(pool) for pool in config.pools}
    return config, managers


def sim_registry(config, managers: dict[str, Any], specs: list[PoolSpec]):
    """The ingress's PoolRegistry over in-process pools whose views carry fake VRAM; caching
    and note_admitted are the registry's own."""
    from bench.common import InProcessMethod, InProcessPool
    from orch.serve.registry import PoolRegistry

    vram = {s.id: s.vram_gib * GiB for s in specs}

    class SimPool(InProcessPool):
        @property
        def snapshot(self) -> InProcessMethod:
            return InProcessMethod(self.with_vram)

        def with_vram(self):
            view = self.manager.snapshot()
            total = vram[view.pool_id]
            return replace(view, vram_total_bytes=total,
                           vram_free_bytes=max(0, total - WEIGHTS - view.active_slots * KV_PER_SLOT))

    handles = {pool_id: SimPool(manager) for pool_id, manager in managers.items()}
    return PoolRegistry(config, handles, config.server.snapshot_ttl_s, nudge_supervisor=False)


Chooser = Callable[[], Awaitable[str]]


def policies(config, managers, specs, seed: int) -> dict[str, tuple[Chooser, Any]]:
    """name -> (choose(), registry or None); each policy gets its own registry."""
    from orch.core.placement import place

    out: dict[str, tuple[Chooser, Any]] = {}

    reg = sim_registry(config, managers, specs)

    async def orchestrator() -> str:
        return place(await reg.views()).pool_id

    out["orchestrator"] = (orchestrator, reg)

    ids = [s.id for s in specs]
    cycle = itertools.cycle(ids)

    async def round_robin() -> str:
        return next(cycle)

    out["round-robin"] = (round_robin, None)
    rng = random.Random(seed + 7)

    async def rand() -> str:
        return rng.choice(ids)

    out["random"] = (rand, None)

    reg_lw = sim_registry(config, managers, specs)

    async def least_work() -> str:
        views = [v for v in await reg_lw.views() if v.accepting]
        return min(views, key=lambda v: ((v.active_slots + v.queue_depth) / v.slots, v.pool_id)).pool_id

    out["what-if: least-work"] = (least_work, reg_lw)

    reg_ew = sim_registry(config, managers, specs)

    async def expected_wait() -> str:
        views = [v for v in await reg_ew.views() if v.accepting]

        def wait_ms(v) -> float:
            ahead = v.active_slots + v.queue_depth - v.slots + 1
            spec = next(s for s in specs if s.id == v.pool_id)
            return max(0, ahead) * v.service_ms / v.slots + spec.first_token_ms

        return min(views, key=lambda v: (wait_ms(v), v.pool_id)).pool_id

    out["what-if: expected-wait"] = (expected_wait, reg_ew)
    return out


async def run_policy(name: str, choose: Chooser, registry: Any, managers: dict[str, Any],
                     plan: list[Arrival], t0: float, stop_at: float) -> PolicyRun:
    from orch.api.tasks import TaskRequest
    from orch.core.errors import OrchError

    run = PolicyRun(name)

    async def one(arrival: Arrival) -> None:
        kind = arrival.kind
        outcome = Outcome(kind["priority"], "-")
        run.outcomes.append(outcome)
        start = t0 + arrival.at_s
        try:
            pool_id = await choose()
        except OrchError:
            outcome.rejected = True
            return
        outcome.pool = pool_id
        request = TaskRequest(prompt="Once upon a time", seed=arrival.seed, **kind)
        manager = managers[pool_id]
        result = await manager.submit(request, f"t{arrival.seed}")
        if result.error is not None:
            outcome.rejected = True
            return
        if registry is not None:
            registry.note_admitted(pool_id)  # as TaskService.admit does after a submit
        task_id = result.admission.task_id
        cursor = 0
        while time.perf_counter() < stop_at:
            got = await manager.poll(task_id, cursor, min(1.0, max(0.01, stop_at - time.perf_counter())))
            if got.error is not None:
                return
            for index, event, data in got.events:
                now = time.perf_counter()
                if event == "token" and math.isinf(outcome.ttft_s):
                    outcome.ttft_s = now - start
                if event == "end":
                    outcome.hit = data.get("finish_reason") != "cancelled" and (now - start) * 1000 <= kind["deadline_ms"]
                cursor = index + 1
            if got.done:
                return

    tasks = []
    for arrival in plan:
        delay = t0 + arrival.at_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(arrival)))
    remaining = stop_at - time.perf_counter()
    if tasks:
        await asyncio.wait(tasks, timeout=max(0.1, remaining))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return run


async def run_scenario(name: str, specs: list[PoolSpec], rate: float, seconds: float, drain_s: float,
                       seed: int) -> list[PolicyRun]:
    plan = arrivals(rate, seconds, seed)
    sets = {}
    for policy_name in ("orchestrator", "round-robin", "random", "what-if: least-work", "what-if: expected-wait"):
        config, managers = build(specs)
        for m in managers.values():
            await m.start()
        sets[policy_name] = (config, managers)
    chosen = {}
    for policy_name, (config, managers) in sets.items():
        chosen[policy_name] = policies(config, managers, specs, seed)[policy_name]
    log(f"{name}: {len(plan)} arrivals at {rate:.1f}/s over {seconds:.0f}s, {len(sets)} policies side by side")
    t0 = time.perf_counter() + 0.2
    stop_at = t0 + seconds + drain_s
    try:
        runs = await asyncio.gather(*(
            run_policy(p, chosen[p][0], chosen[p][1], sets[p][1], plan, t0, stop_at) for p in sets))
    finally:
        for _, managers in sets.values():
            for m in managers.values():
                await m.stop()
    return list(runs)


def report(name: str, specs: list[PoolSpec], runs: list[PolicyRun], rate: float) -> dict[str, Any]:
    rr = next(r for r in runs if r.name == "round-robin")

    def p99(run: PolicyRun, started_only: bool = False) -> float:
        values = [o.ttft_s * 1000 for o in run.outcomes if not o.rejected and (not started_only or not math.isinf(o.ttft_s))]
        return percentile(values, 99)

    def p50(run: PolicyRun) -> float:
        return percentile([o.ttft_s * 1000 for o in run.outcomes if not o.rejected], 50)

    def hit(run: PolicyRun, kind: Optional[str] = None) -> float:
        chosen = [o for o in run.outcomes if kind is None or o.kind == kind]
        return sum(o.hit for o in chosen) / len(chosen) if chosen else math.nan

    rows, data = [], {}
    rr_p99 = p99(rr)
    for run in runs:
        share = Counter(o.pool for o in run.outcomes)
        n = len(run.outcomes)
        no_token = sum(1 for o in run.outcomes if math.isinf(o.ttft_s) and not o.rejected)
        spread = ", ".join(f"{s.id} {share.get(s.id, 0) * 100 / max(1, n):.0f}%" for s in specs)
        rows.append([run.name, n, _ms(p50(run)), _ms(p99(run)), _ms(p99(run, True)), no_token,
                     f"{hit(run, 'interactive') * 100:.1f}%", f"{hit(run, 'batch') * 100:.1f}%", f"{hit(run) * 100:.1f}%",
                     fmt_ratio(ratio(p99(run), rr_p99)) if not (math.isinf(p99(run)) or math.isinf(rr_p99)) else
                     ("inf" if math.isinf(p99(run)) else "-"), spread])
        data[run.name] = {"n": n, "ttft_p50_ms": p50(run), "ttft_p99_ms": p99(run),
                          "ttft_p99_started_ms": p99(run, True), "no_token": no_token, "hit": hit(run),
                          "hit_interactive": hit(run, "interactive"), "hit_batch": hit(run, "batch"), "share": dict(share)}
    pools = "; ".join(f"{s.id}: {s.vram_gib} GiB, {s.slots} slots, {s.tokens_per_s:g} tok/s, first token {s.first_token_ms:g} ms"
                      for s in specs)
    print_table(
        f"Placement quality, scenario {name} ({rate:.1f} tasks/s = {rate / capacity_tasks_per_s(specs) * 100:.0f}% of "
        "the pools' capacity)",
        ["policy", "tasks", "TTFT p50 ms", "TTFT p99 ms", "TTFT p99 ms (started)", "no token", "deadline hit interactive",
         "deadline hit batch", "deadline hit all", "p99 vs round-robin", "tasks per pool"],
        rows,
        notes=[f"Pools: {pools}. Simulated VRAM: free = total - {WEIGHTS // GiB} GiB weights - active slots x "
               f"{KV_PER_SLOT // GiB} GiB KV. Interactive {INTERACTIVE_SHARE:.0%}: max_tokens {INTERACTIVE['max_tokens']}, "
               f"deadline {INTERACTIVE['deadline_ms']} ms; batch: max_tokens {BATCH['max_tokens']}, deadline "
               f"{BATCH['deadline_ms']} ms. 'inf' = more than 1% of tasks never got a first token."],
    )
    return data


def _ms(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:,.0f}"


def main() -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--scenario", default=None, help="comma-separated: " + ",".join(SCENARIOS))
    p.add_argument("--seconds", type=float, default=None, help="seconds of arrivals per scenario")
    p.add_argument("--load", type=float, default=0.3, help="arrival rate as a share of the pools' total capacity")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()
    banner("placement_quality", args.quick)
    names = args.scenario.split(",") if args.scenario else (["big-slow"] if args.quick else list(SCENARIOS))
    seconds = args.seconds or (4.0 if args.quick else 30.0)
    drain = 6.0 if args.quick else 20.0
    results, verdicts = {}, []
    for name in names:
        specs = SCENARIOS[name]
        rate = args.load * capacity_tasks_per_s(specs)
        runs = asyncio.run(run_scenario(name, specs, rate, seconds, drain, args.seed))
        data = report(name, specs, runs, rate)
        results[name] = data
        orch, rr = data["orchestrator"]["ttft_p99_ms"], data["round-robin"]["ttft_p99_ms"]
        better = (1 - orch / rr) if not (math.isinf(orch) or math.isinf(rr)) else (-math.inf if math.isinf(orch) else math.nan)
        verdicts.append([name, _ms(orch), _ms(rr), "-" if math.isnan(better) else
                         ("orchestrator never starts >1% of tasks" if math.isinf(better) else f"{better * 100:+.0f}%"),
                         "holds" if better >= 0.30 else "does not hold"])
    print_table("Placement target: orchestrator p99 TTFT at least 30% better than round-robin",
                ["scenario", "orchestrator p99 ms", "round-robin p99 ms", "improvement", "verdict"], verdicts)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
