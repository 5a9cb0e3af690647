"""Scale: memory per queued task at 10,000 queued tasks, and placement decision time with
1, 16 and 256 pools in the snapshot. No Ray.

Memory: one ``PoolManager`` (queue capacity 20,000, one slot held by a mock task that hangs,
so nothing leaves the queue) takes 10,000 ``submit``s; the growth is measured with
tracemalloc (Python allocations) in one pass and as RSS growth in a second pass without
tracemalloc, for a short prompt and for a 4 KiB one. Baselines in the same run: the JSON
body a client sends for that task, and a bare ``TaskQueue`` holding 10,000 trivial items.

Placement: ``place()`` over N ``PoolView``s, and the ingress's whole per-request
placement step (``PoolRegistry.views()`` on a warm cache + ``place()``), ratios against N=1.

    python bench/scale.py [--quick] [--tasks 10000]
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import InProcessMethod, banner, fmt_ratio, log, parser, print_table, ratio, write_json  # noqa: E402

SHORT = "Once upon a time"
LONG = ("Once upon a time " * 256)[:4096]
PROMPTS = {"short": SHORT, "long": LONG}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def queued_memory(n: int, prompt: str, traced: bool) -> dict[str, Any]:
    from orch.api.tasks import TaskRequest
    from orch.config import PoolConfig
    from orch.pools.manager import PoolManager

    config = PoolConfig(id="scale", engine="mock", model="mock-model", num_gpus=0, allow_cpu=True, slots=1,
                        queue={"capacity": 2 * n, "policy": "reject"})
    manager = PoolManager(config)
    await manager.start()
    try:
        hold = await manager.submit(TaskRequest(prompt="@fault=hang", max_tokens=8), "hold")
        assert hold.error is None, hold
        for _ in range(200):  # the hanging task takes the only slot
            if manager.active_slots == 1:
                break
            await asyncio.sleep(0.01)
        body = json.dumps({"prompt": prompt, "max_tokens": 64, "seed": 1}).encode()
        gc.collect()
        if traced:
            tracemalloc.start()
            before = tracemalloc.take_snapshot()
        rss0 = rss_bytes()
        t0 = time.perf_counter()
        for i in range(n):
            request = TaskRequest.model_validate_json(body)  # what arrives at the pool, deserialized
            result = await manager.submit(request, f"task-{i:06d}")
            assert result.error is None, result
        elapsed = time.perf_counter() - t0
        del request, result
        gc.collect()
        rss1 = rss_bytes()
        out: dict[str, Any] = {"queued": len(manager.queue), "submit_per_s": n / elapsed, "body_bytes": len(body),
                               "rss_per_task": (rss1 - rss0) / n}
        if traced:
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
            stats = after.compare_to(before, "filename")
            out["traced_per_task"] = sum(s.size_diff for s in stats) / n
            out["top"] = [(Path(s.traceback[0].filename).name, s.size_diff / n) for s in stats[:5]]
        return out
    finally:
        await manager.stop()


def rss_in_child(which: str, n: int) -> dict[str, Any]:
    """RSS growth measured in a fresh interpreter: in this one, the allocator's free arenas
    left by earlier passes would absorb the growth."""
    import subprocess

    done = subprocess.run([sys.executable, __file__, "--rss-child", which, "--tasks", str(n)], capture_output=True,
                          text=True, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bare_queue_memory(n: int) -> float:
    from orch.core.queue import TaskQueue

    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    queue: TaskQueue[int] = TaskQueue(2 * n)
    for i in range(n):
        queue.enqueue(f"task-{i:06d}", "interactive", i)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    per = sum(s.size_diff for s in after.compare_to(before, "filename")) / n
    del queue
    return per


def views(n: int):
    from orch.core.placement import PoolView

    return [PoolView(pool_id=f"pool-{i:03d}", engine="mock", model_ref="mock-model", ready=True,
                     vram_free_bytes=(i * 7919) % 97 * 2**30, vram_total_bytes=96 * 2**30, slots=4,
                     active_slots=i % 5, queue_depth=i % 3) for i in range(n)]


def fixed_handles(pool_views: list[Any]) -> dict[str, Any]:
    """Pool handles whose snapshot call answers a fixed view (and its detail), in process."""
    from orch.api.pools import PoolDetail

    return {view.pool_id: SimpleNamespace(snapshot=InProcessMethod(lambda view=view: view),
                                          detail=InProcessMethod(lambda view=view: PoolDetail(view.pool_id)))
            for view in pool_views}


def time_per_call(fn, budget_s: float) -> float:
    """Microseconds per call: repeated until the time budget is spent (at most 1e6 calls)."""
    calls = 0
    t0 = time.perf_counter()
    deadline = t0 + budget_s
    while calls < 1_000_000:
        for _ in range(20):
            fn()
        calls += 20
        if time.perf_counter() >= deadline:
            break
    return (time.perf_counter() - t0) / calls * 1e6


def placement_times(sizes: list[int], budget_s: float) -> list[dict[str, Any]]:
    from orch.config import parse_config
    from orch.core.placement import place
    from orch.serve.registry import PoolRegistry

    out = []
    for n in sizes:
        pool_views = views(n)
        place_us = time_per_call(lambda: place(pool_views, model_ref="mock-model"), budget_s)
        config = parse_config({"pools": [{"id": f"pool-{i:03d}", "engine": "mock", "model": "mock-model",
                                          "num_gpus": 0, "allow_cpu": True} for i in range(n)]}, "scale")
        registry = PoolRegistry(config, fixed_handles(pool_views), ttl_s=1e9, nudge_supervisor=False)

        async def steps(k: int) -> float:
            t0 = time.perf_counter()
            for _ in range(k):
                place(await registry.views(), model_ref="mock-model")
            return time.perf_counter() - t0

        async def measure_steps() -> float:
            await registry.refresh()  # a warm cache: what every request between two refreshes sees
            k, spent = 20, 0.0
            while spent < budget_s and k < 1_000_000:
                spent = await steps(k)
                if spent < budget_s:
                    k *= 2
            return spent / k * 1e6

        step_us = asyncio.run(measure_steps())
        out.append({"pools": n, "place_us": place_us, "step_us": step_us})
    return out


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


def main() -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=None)
    p.add_argument("--rss-child", choices=sorted(PROMPTS), help=argparse_hidden())
    args = p.parse_args()
    if args.rss_child:
        print(json.dumps(asyncio.run(queued_memory(args.tasks, PROMPTS[args.rss_child], traced=False))))
        return 0
    banner("scale", args.quick)
    n = args.tasks or (2000 if args.quick else 10_000)
    budget = 0.15 if args.quick else 1.0

    log(f"memory: {n} queued tasks")
    mem = {}
    for label, which in (("short prompt (16 B)", "short"), ("4 KiB prompt", "long")):
        traced = asyncio.run(queued_memory(n, PROMPTS[which], traced=True))
        mem[label] = {"traced": traced, "rss": rss_in_child(which, n)}
    queue_only = bare_queue_memory(n)
    mem_rows = []
    for label, m in mem.items():
        t, r = m["traced"], m["rss"]
        mem_rows.append([label, t["queued"], t["body_bytes"], t["traced_per_task"], r["rss_per_task"],
                         fmt_ratio(ratio(t["traced_per_task"], t["body_bytes"])),
                         fmt_ratio(ratio(t["traced_per_task"], queue_only)), r["submit_per_s"]])
    top = mem["short prompt (16 B)"]["traced"]["top"]
    print_table(
        f"Memory per queued task ({n:,} queued in one PoolManager)",
        ["prompt", "queued", "request body B", "traced B/task", "RSS B/task", "traced / body", "traced / bare queue entry",
         "submits/s in process"],
        mem_rows,
        notes=[f"Bare TaskQueue entry (id + trivial item): {queue_only:.0f} B. Largest allocators per task (short prompt): "
               + ", ".join(f"{name} {size:.0f} B" for name, size in top) + ".",
               f"At this rate {n:,} queued tasks cost about "
               f"{mem['short prompt (16 B)']['traced']['traced_per_task'] * n / 2**20:.1f} MiB of Python heap in the pool actor."],
    )

    log("placement decision time")
    times = placement_times([1, 16, 256], budget)
    base = times[0]
    print_table(
        "Placement decision time by pools in the snapshot",
        ["pools", "place() us", "place() vs 1 pool", "registry.views() + place() us", "views+place vs 1 pool"],
        [[t["pools"], t["place_us"], fmt_ratio(ratio(t["place_us"], base["place_us"])), t["step_us"],
          fmt_ratio(ratio(t["step_us"], base["step_us"]))] for t in times],
        notes=["registry.views() + place() is the ingress's per-request placement step on a warm snapshot cache "
               "(views() answers the PoolViews the last refresh fetched)."],
    )
    write_json(args.json, {"memory": mem, "queue_only": queue_only, "placement": times})
    return 0


if __name__ == "__main__":
    sys.exit(main())
