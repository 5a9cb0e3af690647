"""Serve proxy cost: the same tiny Starlette app (bench/proxy_app.py) through Ray Serve's
HTTP proxy and under plain uvicorn, in the same run.

Measured for each: a no-op GET one request at a time (latency p50/p99), no-op GETs from 16
concurrent keep-alive connections (requests/s), and an SSE route that sends 3 events 50 ms
apart (time to the first, second and third event as the client sees them). Ratios are
Serve / uvicorn, each Serve variant against a uvicorn measurement taken just before it.

Serve variants (full run; --quick runs only the default):
- default: Serve as the orchestrator deploys it today;
- no-access-log: ``logging_config.enable_access_log: false`` for the proxy and the replica;
- same-loop: RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 and
  RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0 (user code and router on the replica's/proxy's
  main loop), access log off;
- direct-ingress: RAY_SERVE_ENABLE_DIRECT_INGRESS=1 (the replica serves HTTP itself on a
  port from 30000-31000; no proxy hop), access log off.

    python bench/serve_proxy.py [--quick] [--variants default,no-access-log]
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    DIRECT_INGRESS_ENV,
    HOST,
    RawHttp,
    banner,
    bounded_load,
    find_direct_ingress_port,
    fmt_ratio,
    free_port,
    log,
    parser,
    print_table,
    ray_start,
    ray_stop,
    ratio,
    serve_start,
    subprocess_server,
    summary,
    wait_http,
    write_json,
)

SAME_LOOP = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {"env": {}, "access_log": True},
    "no-access-log": {"env": {}, "access_log": False},
    "same-loop": {"env": SAME_LOOP, "access_log": False},
    "direct-ingress": {"env": DIRECT_INGRESS_ENV, "access_log": False},
}


async def measure(host: str, port: int, quick: bool) -> dict[str, Any]:
    n_seq = 60 if quick else 400
    n_sse = 15 if quick else 120
    out: dict[str, Any] = {}

    conn = RawHttp(host, port)
    try:
        for _ in range(10):  # warm-up
            await conn.request("GET", "/noop")
        lat = []
        for _ in range(n_seq):
            t0 = time.perf_counter()
            status, _, _ = await conn.request("GET", "/noop")
            lat.append(time.perf_counter() - t0)
            assert status == 200, status
        out["noop_c1"] = summary([x * 1000 for x in lat])

        firsts, seconds, thirds, whole = [], [], [], []
        for _ in range(n_sse):
            t0 = time.perf_counter()
            status, chunks = await conn.stream("GET", "/sse?n=3&gap_ms=50")
            assert status == 200, status
            seen = 0
            marks = []
            async for chunk in chunks:
                now = time.perf_counter()
                got = chunk.count(b"\n\n")
                for _ in range(got):
                    marks.append(now - t0)
                seen += got
            whole.append(time.perf_counter() - t0)
            if len(marks) == 3:
                firsts.append(marks[0] * 1000)
                seconds.append(marks[1] * 1000)
                thirds.append(marks[2] * 1000)
        out["sse_first"] = summary(firsts)
        out["sse_second"] = summary(seconds)
        out["sse_third"] = summary(thirds)
    finally:
        await conn.close()

    conns = [RawHttp(host, port) for _ in range(16)]

    async def call(worker: int, n: int) -> int:
        status, _, _ = await conns[worker].request("GET", "/noop")
        return status

    try:
        load = await bounded_load(call, concurrency=16, max_requests=600 if quick else 6000,
                                  max_seconds=2.0 if quick else 6.0)
    finally:
        for c in conns:
            await c.close()
    out["noop_c16_rps"] = load.rate
    out["noop_c16_p50_ms"] = summary([x * 1000 for x in load.latencies_s])["p50"]
    out["noop_c16_ok"] = load.outcomes.get(200, 0) / max(1, load.count)
    out["client_cpu_share"] = load.client_cpu_s / load.elapsed_s if load.elapsed_s else float("nan")
    return out


def deploy_serve_app(access_log: bool) -> None:
    from ray import serve

    from bench.proxy_app import serve_app

    serve.run(serve_app(access_log), name="proxybench", route_prefix="/")


def run_variant(name: str, spec: dict[str, Any], quick: bool) -> Optional[dict[str, Any]]:
    saved = {k: os.environ.get(k) for k in spec["env"]}
    try:
        ray_start(2, spec["env"])
        port = serve_start(access_log=spec["access_log"])
        deploy_serve_app(spec["access_log"])
        if name == "direct-ingress":
            try:
                port = find_direct_ingress_port("/noop")
            except RuntimeError as exc:
                log(f"direct ingress: {exc}; variant skipped")
                return None
        else:
            wait_http(f"http://{HOST}:{port}/noop", 60, ok=lambda s: s == 200)
        return asyncio.run(measure(HOST, port, quick))
    finally:
        ray_stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main() -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--variants", default=None, help="comma-separated Serve variants: " + ",".join(VARIANTS))
    args = p.parse_args()
    banner("serve_proxy", args.quick)
    names = (args.variants.split(",") if args.variants else (["default"] if args.quick else list(VARIANTS)))
    for n in names:
        if n not in VARIANTS:
            raise SystemExit(f"unknown variant {n}; known: {', '.join(VARIANTS)}")

    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    cmd = [sys.executable, "-m", "uvicorn", "bench.proxy_app:app", "--host", HOST, "--port", str(port),
           "--loop", "asyncio", "--http", "httptools", "--no-access-log", "--log-level", "warning"]
    results: dict[str, Any] = {}
    with subprocess_server(cmd, ready_url=f"http://{HOST}:{port}/noop", env=env):
        for name in names:
            log(f"uvicorn baseline before {name}")
            base = asyncio.run(measure(HOST, port, args.quick))
            log(f"serve variant {name}")
            got = run_variant(name, VARIANTS[name], args.quick)
            results[name] = {"uvicorn": base, "serve": got}

    rows = []
    for name, pair in results.items():
        base, got = pair["uvicorn"], pair["serve"]
        if got is None:
            rows.append([f"serve:{name}", "skipped", "-", "-", "-", "-", "-", "-", "-"])
            continue
        rows.append(["uvicorn (before)", base["noop_c1"]["p50"], base["noop_c1"]["p99"], base["noop_c16_rps"],
                     base["sse_first"]["p50"], base["sse_first"]["p99"], base["sse_second"]["p50"],
                     base["sse_third"]["p50"], "1.000x"])
        rows.append([f"serve:{name}", got["noop_c1"]["p50"], got["noop_c1"]["p99"], got["noop_c16_rps"],
                     got["sse_first"]["p50"], got["sse_first"]["p99"], got["sse_second"]["p50"],
                     got["sse_third"]["p50"],
                     "p50 " + fmt_ratio(ratio(got["noop_c1"]["p50"], base["noop_c1"]["p50"]))
                     + ", rps " + fmt_ratio(ratio(got["noop_c16_rps"], base["noop_c16_rps"]))
                     + ", 1st-event " + fmt_ratio(ratio(got["sse_first"]["p50"], base["sse_first"]["p50"]))])
    print_table(
        "Serve proxy vs plain uvicorn (same Starlette app, same run)",
        ["path", "no-op p50 ms", "no-op p99 ms", "no-op req/s (16 conns)", "SSE 1st event p50 ms",
         "SSE 1st p99 ms", "SSE 2nd p50 ms (sent at 50)", "SSE 3rd p50 ms (sent at 100)", "ratio serve/uvicorn"],
        rows,
        notes=["Added cost of the Serve path (p50 ms, Serve minus uvicorn measured just before it): "
               + "; ".join(f"{n}: no-op {pair['serve']['noop_c1']['p50'] - pair['uvicorn']['noop_c1']['p50']:+.2f}, "
                           f"1st SSE event {pair['serve']['sse_first']['p50'] - pair['uvicorn']['sse_first']['p50']:+.2f}"
                           for n, pair in results.items() if pair["serve"] is not None)],
    )
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
