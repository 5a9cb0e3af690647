"""Admission rate: ``POST /v2/tasks`` answers (202 accepted or 429 queue full) per second
through Ray Serve and one ingress replica, with p50/p99 latency.

One orchestrator app with three mock pools, each request pinned to one of them:

- full: one slot held by a task that hangs and a queue of 8 already full: every POST is
  a 429 (``ADMISSION_REJECT``);
- empty: a fast mock engine (``tokens_per_s: 0``), 4 slots, ``max_tokens: 1``: every POST
  is a 202 and the task runs and ends at once, so the queue stays empty;
- deep: the only slot hangs and the queue (capacity 1,000,000) only grows: every POST is a
  202 with nothing running, admission alone.

Baseline in the same run and the same Serve instance: a no-op Starlette POST route
(bench/proxy_app.py) answering 202 with a small JSON body, so the ratio says how much of
the rate Serve's proxy alone leaves. The load generator is an asyncio closed loop over raw
keep-alive HTTP/1.1 connections on 127.0.0.1 (bounded in requests and seconds); its own
CPU use is reported.

    python bench/admission.py [--quick] [--concurrency 32] [--seconds 8] [--direct-ingress]
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
    add_serve_env_arg,
    asgi_call,
    banner,
    bounded_load,
    find_direct_ingress_port,
    fmt_ratio,
    in_process_ingress,
    ingress_path,
    log,
    mock_pool,
    orchestrator,
    parser,
    print_profiles,
    print_table,
    profiled,
    ratio,
    serve_env,
    serve_pids,
    summary,
    write_json,
)

FULL_CAPACITY = 8


def body(pool: str, prompt: str = "Once upon a time", max_tokens: int = 1) -> bytes:
    return json.dumps({"prompt": prompt, "max_tokens": max_tokens, "placement": {"pin_pool_id": pool}}).encode()


async def load(port: int, path: str, payload: bytes, concurrency: int, max_requests: int, seconds: float):
    conns = [RawHttp(HOST, port) for _ in range(concurrency)]

    async def call(worker: int, n: int) -> int:
        status, _, _ = await conns[worker].request("POST", path, payload)
        return status

    try:
        for c in conns:  # connect and warm every connection first
            await c.request("POST", path, payload)
        return await bounded_load(call, concurrency=concurrency, max_requests=max_requests, max_seconds=seconds)
    finally:
        for c in conns:
            await c.close()


async def prepare(port: int) -> None:
    """Hold the only slot of 'full' and 'deep' with a hanging task, then fill 'full'."""
    conn = RawHttp(HOST, port)
    try:
        for pool in ("full", "deep"):
            status, _, payload = await conn.request("POST", "/v2/tasks", body(pool, "@fault=hang", 8))
            assert status == 202, (status, payload)
        await asyncio.sleep(0.5)  # let the hanging tasks take the slots
        for _ in range(FULL_CAPACITY):
            status, _, payload = await conn.request("POST", "/v2/tasks", body("full", "@fault=hang", 8))
            assert status == 202, (status, payload)
        status, _, payload = await conn.request("POST", "/v2/tasks", body("full"))
        assert status == 429, (status, payload)
    finally:
        await conn.close()


async def in_process(seconds: float) -> dict[str, Any]:
    """The ingress app's own code, called as ASGI in this process, pools in process: the
    rate the orchestrator's Python allows with Ray, Serve and HTTP taken away."""
    app, managers = await in_process_ingress([
        mock_pool("full", slots=1, capacity=FULL_CAPACITY, tokens_per_s=0),
        mock_pool("deep", slots=1, capacity=1_000_000, tokens_per_s=0),
    ])
    out = {}
    try:
        for pool in ("full", "deep"):
            assert await asgi_call(app, "POST", "/v2/tasks", body(pool, "@fault=hang", 8)) == 202
        await asyncio.sleep(0.2)
        for _ in range(FULL_CAPACITY):
            assert await asgi_call(app, "POST", "/v2/tasks", body("full", "@fault=hang", 8)) == 202
        for label, pool in (("in process: full queue (429)", "full"), ("in process: deep queue (202, queued)", "deep")):
            payload = body(pool)
            lat, statuses = [], {}
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds and len(lat) < 200_000:
                t = time.perf_counter()
                status = await asgi_call(app, "POST", "/v2/tasks", payload)
                lat.append(time.perf_counter() - t)
                statuses[status] = statuses.get(status, 0) + 1
            elapsed = time.perf_counter() - t0
            s = summary([x * 1000 for x in lat])
            out[label] = {"rate": len(lat) / elapsed, "count": len(lat), "outcomes": statuses, "p50_ms": s["p50"],
                          "p99_ms": s["p99"], "client_cores": float("nan")}
    finally:
        for m in managers.values():
            await m.stop()
    return out


def main() -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, default=None)
    p.add_argument("--seconds", type=float, default=None)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--direct-ingress", action="store_true",
                   help="Serve's experimental direct ingress (replica serves HTTP, no proxy)")
    add_serve_env_arg(p)
    args = p.parse_args()
    env = serve_env(args)
    path_name = ingress_path(args)
    banner("admission" + (f" ({path_name})" if args.direct_ingress or env else ""), args.quick)
    concurrency = args.concurrency or (16 if args.quick else 32)
    seconds = args.seconds or (1.5 if args.quick else 8.0)
    max_requests = 200_000

    from bench.proxy_app import serve_app

    pools = [
        mock_pool("full", slots=1, capacity=FULL_CAPACITY, tokens_per_s=0),
        mock_pool("empty", slots=4, capacity=100_000, tokens_per_s=0),
        mock_pool("deep", slots=1, capacity=1_000_000, tokens_per_s=0),
    ]
    results: dict[str, Any] = {}
    log("in process: the ingress app's own code, one request at a time")
    results.update(asyncio.run(in_process(seconds)))
    with orchestrator(pools, name="bench-admission", num_cpus=3, direct_ingress=args.direct_ingress, ray_env=env,
                      extra_apps=[("/noop-app", serve_app())]) as orch:
        noop_port = orch.port
        if args.direct_ingress:
            noop_port = find_direct_ingress_port("/noop-app/noop")
        asyncio.run(prepare(orch.port))
        cases = [
            ("no-op POST (Serve baseline)", noop_port, "/noop-app/noop", b'{"prompt":"x"}'),
            ("POST /v2/tasks, full queue (429)", orch.port, "/v2/tasks", body("full")),
            ("POST /v2/tasks, empty queue (202, runs)", orch.port, "/v2/tasks", body("empty")),
            ("POST /v2/tasks, deep queue (202, queued)", orch.port, "/v2/tasks", body("deep")),
        ]
        for label, port, path, payload in cases:
            log(f"{label}: {concurrency} connections, {seconds:.1f}s")
            got = asyncio.run(load(port, path, payload, concurrency, max_requests, seconds))
            lat = summary([x * 1000 for x in got.latencies_s])
            results[label] = {"rate": got.rate, "count": got.count, "outcomes": dict(got.outcomes),
                              "p50_ms": lat["p50"], "p99_ms": lat["p99"],
                              "client_cores": got.client_cpu_s / got.elapsed_s}
        pids = serve_pids("bench-admission")
        if args.direct_ingress:
            pids.pop("serve proxy", None)
        prof_s = 2 if args.quick else 5
        log(f"profiling the full-queue (429) case for {prof_s}s: {', '.join(pids)}")
        with profiled(pids, prof_s, enabled=not args.no_profile) as profiles:
            asyncio.run(load(orch.port, "/v2/tasks", body("full"), concurrency, max_requests, prof_s + 1.0))
    base = results["no-op POST (Serve baseline)"]["rate"]
    print_profiles("Where the time goes: POST /v2/tasks answered 429", profiles)
    rows = [[label, r["count"], ", ".join(f"{k}: {v}" for k, v in sorted(r["outcomes"].items(), key=str)),
             r["rate"], r["p50_ms"], r["p99_ms"], fmt_ratio(ratio(r["rate"], base)),
             fmt_ratio(ratio(r["rate"], 2000)), f"{r['client_cores']:.2f}"] for label, r in results.items()]
    print_table(
        f"Admission rate ({concurrency} keep-alive connections, one ingress replica"
        + f", {path_name})",
        ["case", "requests", "answers", "answers/s", "p50 ms", "p99 ms", "vs no-op POST", "vs target 2,000/s",
         "client cores"],
        rows,
        notes=["Every orchestrator request is pinned (placement.pin_pool_id) to its pool; the no-op POST is a "
               "Starlette route in its own Serve deployment on the same proxy. 'in process' rows: the ingress's "
               "Starlette app and TaskService called as ASGI in the benchmark process, one request at a time, "
               "pools as in-process PoolManagers (no Ray, no HTTP): the orchestrator's own Python per request."],
    )
    verdicts = [[label, f"{r['rate']:,.0f}/s", "holds" if r["rate"] >= 2000 else "does not hold"]
                for label, r in results.items() if label.startswith("POST /v2/tasks, full")
                or label.startswith("POST /v2/tasks, empty")]
    print_table("Admission target (>= 2,000 answers/s on 2 cores)", ["case", "measured", "verdict"], verdicts)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
