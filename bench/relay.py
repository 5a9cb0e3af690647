"""Relay ceiling: token events per second one ingress replica delivers to N concurrent SSE
clients, with a mock pool producing tokens as fast as it can, and where the time goes.

Three layers, measured in the same run, each with N concurrent streams of back-to-back
tasks (``max_tokens`` tokens each):

1. in process: a ``PoolManager`` with the mock engine and N consumers polling it the way
   the ingress does (no Ray, no HTTP): the producer's own ceiling, the baseline;
2. actor hop: the same pool as a Ray actor, the driver calling ``submit`` + ``poll``
   directly (the ingress's calls, no Serve, no HTTP);
3. HTTP: ``POST /v2/tasks`` + ``GET /v2/tasks/{id}/events`` through Serve's proxy and one
   ingress replica, counting ``event: token`` frames as they arrive.

Then a profiling pass of layer 3 with ``py-spy record`` on the ingress replica, the Serve
proxy and the pool actor (pids from Ray's actor table), plus the CPU seconds each process
used during the measured HTTP pass.

    python bench/relay.py [--quick] [--levels 1,8,32] [--max-tokens 2000] [--seconds 8]
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    HOST,
    RawHttp,
    banner,
    cpu_seconds,
    fmt_ratio,
    log,
    mock_pool,
    orchestrator,
    parser,
    print_table,
    print_profiles,
    profiled,
    ratio,
    serve_pids,
    write_json,
)

APP = "bench-relay"
POOL = "relay"


async def closed_streams(n: int, seconds: float, stream_one) -> dict[str, Any]:
    """n workers, each running tasks back to back until ``seconds`` passed; stream_one
    returns the token events it received."""
    events = tasks = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds

    async def worker(w: int) -> None:
        nonlocal events, tasks
        k = 0
        while time.perf_counter() < deadline and k < 100_000:
            got = await stream_one(w, k)  # not `events += await ...`: that reads `events` before awaiting
            events += got
            tasks += 1
            k += 1

    await asyncio.wait_for(asyncio.gather(*(worker(w) for w in range(n))), seconds + 120)
    elapsed = time.perf_counter() - t0
    return {"events": events, "tasks": tasks, "elapsed_s": elapsed, "events_per_s": events / elapsed}


# -- layer 1 -----------------------------------------------------------------------------
async def in_process(n: int, seconds: float, max_tokens: int) -> dict[str, Any]:
    from orch.api.tasks import TaskRequest
    from orch.config import PoolConfig
    from orch.pools.manager import PoolManager

    spec = mock_pool(POOL, slots=max(n, 1), capacity=1024, tokens_per_s=0)
    manager = PoolManager(PoolConfig.model_validate(spec))
    await manager.start()

    async def one(w: int, k: int) -> int:
        result = await manager.submit(TaskRequest(prompt="Once upon a time", max_tokens=max_tokens, seed=k),
                                      f"w{w}-{k}")
        assert result.error is None, result
        cursor, got = 0, 0
        while True:
            polled = await manager.poll(result.admission.task_id, cursor, 15.0)
            batch = polled.events
            if batch:
                got += sum(1 for e in batch if e[1] == "token")
                cursor = batch[-1][0] + 1
            if polled.done:
                return got

    try:
        return await closed_streams(n, seconds, one)
    finally:
        await manager.stop()


# -- layer 2 -----------------------------------------------------------------------------
async def actor_hop(namespace: str, n: int, seconds: float, max_tokens: int) -> dict[str, Any]:
    import ray

    from orch.api.tasks import TaskRequest
    from orch.pools.actor import actor_name

    handle = ray.get_actor(actor_name(POOL), namespace=namespace)

    async def one(w: int, k: int) -> int:
        task_id = f"hop-{w}-{k}-{time.monotonic_ns()}"
        result = await handle.submit.remote(TaskRequest(prompt="Once upon a time", max_tokens=max_tokens, seed=k),
                                            task_id, None)
        assert result.error is None, result
        cursor, got = 0, 0
        while True:
            polled = await handle.poll.remote(task_id, cursor, 15.0)
            batch = polled.events
            if batch:
                got += sum(1 for e in batch if e[1] == "token")
                cursor = batch[-1][0] + 1
            if polled.done:
                return got

    return await closed_streams(n, seconds, one)


# -- layer 3 -----------------------------------------------------------------------------
async def http_sse(port: int, n: int, seconds: float, max_tokens: int) -> dict[str, Any]:
    conns = [RawHttp(HOST, port) for _ in range(n)]
    marker = b"event: token"

    async def one(w: int, k: int) -> int:
        conn = conns[w]
        body = json.dumps({"prompt": "Once upon a time", "max_tokens": max_tokens, "seed": k}).encode()
        status, _, payload = await conn.request("POST", "/v2/tasks", body)
        if status != 202:
            raise RuntimeError(f"POST /v2/tasks -> {status} {payload[:200]!r}")
        task_id = json.loads(payload)["task_id"]
        status, chunks = await conn.stream("GET", f"/v2/tasks/{task_id}/events")
        got = 0
        async for chunk in chunks:  # one HTTP chunk = one relayed batch of whole frames
            got += chunk.count(marker)
        return got

    try:
        return await closed_streams(n, seconds, one)
    finally:
        for c in conns:
            await c.close()


def main() -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--levels", default=None, help="concurrent streams, e.g. 1,8,32")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--seconds", type=float, default=None, help="seconds per measurement")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--direct-ingress", action="store_true",
                   help="Serve's experimental direct ingress (the replica serves HTTP, no proxy)")
    args = p.parse_args()
    banner("relay" + (" (direct ingress)" if args.direct_ingress else ""), args.quick)
    levels = [int(x) for x in args.levels.split(",")] if args.levels else ([8] if args.quick else [1, 8, 32])
    max_tokens = args.max_tokens or (500 if args.quick else 2000)
    seconds = args.seconds or (1.5 if args.quick else 8.0)
    slots = max(levels)
    results: dict[str, dict[int, dict[str, Any]]] = {"in process": {}, "actor hop": {}, "HTTP SSE (Serve)": {}}
    cpu: dict[str, float] = {}

    for n in levels:
        log(f"in process: {n} streams")
        results["in process"][n] = asyncio.run(in_process(n, seconds, max_tokens))

    with orchestrator([mock_pool(POOL, slots=slots, capacity=1024, tokens_per_s=0)], name=APP, num_cpus=3,
                      direct_ingress=args.direct_ingress) as orch:
        namespace = orch.config.namespace
        pids = serve_pids(APP)
        if args.direct_ingress:
            pids.pop("serve proxy", None)
        log(f"pids: {pids}")
        for n in levels:
            log(f"actor hop: {n} streams")
            results["actor hop"][n] = asyncio.run(actor_hop(namespace, n, seconds, max_tokens))
        for n in levels:
            log(f"HTTP SSE: {n} streams")
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            t0 = time.perf_counter()
            client0 = time.process_time()
            results["HTTP SSE (Serve)"][n] = asyncio.run(http_sse(orch.port, n, seconds, max_tokens))
            if n == max(levels):
                wall = time.perf_counter() - t0
                cpu = {name: (cpu_seconds(pid) - before[name]) / wall for name, pid in pids.items()}
                cpu["bench client (this process)"] = (time.process_time() - client0) / wall

        prof_s = 2 if args.quick else 6
        log(f"profiling {max(levels)} streams for {prof_s}s: {', '.join(pids)}")
        with profiled(pids, prof_s, enabled=not args.no_profile) as profiles:
            asyncio.run(http_sse(orch.port, max(levels), prof_s + 1.0, max_tokens))

    rows = []
    for layer, by_n in results.items():
        for n, r in by_n.items():
            base = results["in process"][n]["events_per_s"]
            rows.append([layer, n, r["tasks"], r["events"], r["events_per_s"], fmt_ratio(ratio(r["events_per_s"], base)),
                         fmt_ratio(ratio(r["events_per_s"], 20_000)) if layer.startswith("HTTP") else "-"])
    print_table(
        f"Relay ceiling: token events/s to N concurrent streams (mock engine as fast as possible, "
        f"max_tokens {max_tokens}, one ingress replica" + (", direct ingress)" if args.direct_ingress else ")"),
        ["layer", "streams", "tasks", "token events", "events/s", "vs in process", "vs target 20,000/s"],
        rows,
    )
    if cpu:
        print_table(f"CPU use during the HTTP pass at {max(levels)} streams (cores busy, of 2)",
                    ["process", "cores"], [[name, f"{share:.2f}"] for name, share in cpu.items()])
    print_profiles(f"Where the time goes during the HTTP pass at {max(levels)} streams", profiles)
    top = max(levels)
    got = results["HTTP SSE (Serve)"][top]["events_per_s"]
    print_table("Relay target", ["target", "wanted", "measured", "verdict"],
                [[f"token events/s, one ingress replica, {top} streams", ">= 20,000/s", f"{got:,.0f}/s",
                  "holds" if got >= 20_000 else "does not hold"]])
    write_json(args.json, {"results": results, "cpu": cpu, "profiles": profiles})
    return 0


if __name__ == "__main__":
    sys.exit(main())
