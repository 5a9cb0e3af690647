"""Hop-by-hop trace of a request's first token through the whole orchestrator.

Each request is timed by this client (send, first byte of the first token) and by the
orchestrator itself: the ingress notes when the request arrived, when placement sent the
submit, when the admission came back, when the page with the first token arrived and when
it was handed to the route that writes it; the pool notes admission, start, the engine's first token and when that
page left (``GET /v2/tasks/{id}/trace``, read after each stream, outside the timed part).
Every mark is ``time.monotonic()``, one system-wide clock on this host, so the marks of the
client, Serve's proxy, the ingress replica and the pool actor form one timeline.

Routes: ``/v1/completions`` (stream; one request) and ``/v2/tasks`` (POST, then GET of the
events). Pool: SmolLM2 on llama.cpp, one slot and 1 thread unless ``--slots``/``--threads``, no
prefix cache (as bench/overhead.py), or ``--mock`` (an engine whose first token takes ``--mock-ttft-ms``).
The platform floor (a no-op POST through Serve's HTTP path, one Ray actor round trip) is
measured in the same run.

    python bench/trace.py [--quick] [--levels 1,8] [--requests 40] [--max-tokens 16]
    python bench/trace.py --direct-ingress           # Serve's direct ingress (no proxy)
    python bench/trace.py --serve-env RAY_SERVE_THROUGHPUT_OPTIMIZED=1
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    HOST,
    RawHttp,
    add_serve_env_arg,
    banner,
    find_direct_ingress_port,
    ingress_path,
    log,
    mock_pool,
    orchestrator,
    parser,
    print_table,
    serve_env,
    smollm2_pool,
    summary,
    write_json,
)
from bench.overhead import PROMPT, SEED, TEMPERATURE, TOP_K, TOP_P, platform_floor  # noqa: E402
from orch.api import sse_client  # noqa: E402

#: (name, start mark, end mark); marks are the trace's, plus the client's ``sent`` and
#: ``first_byte``. A hop whose marks are missing (v1 has no second request) is left out.
HOPS = (
    ("client -> ingress (Serve's HTTP path in)", "sent", "received_at"),
    ("ingress: body, validation (OpenAI: model, prompt)", "received_at", "parsed_at"),
    ("ingress: sessions, views, placement", "parsed_at", "placed_at"),
    ("submit -> pool admitted", "placed_at", "pool_admitted_at"),
    ("admission -> back at ingress", "pool_admitted_at", "admitted_at"),
    ("v2: 202 -> GET .../events at ingress", "admitted_at", "stream_received_at"),
    ("pool queue (admitted -> started)", "pool_admitted_at", "pool_started_at"),
    ("engine: start -> first token", "pool_started_at", "pool_first_token_at"),
    ("pool emit: token -> page sent", "pool_first_token_at", "pool_sent_at"),
    ("page: pool -> ingress", "pool_sent_at", "page_received_at"),
    ("ingress: page -> handed to the route", "page_received_at", "relayed_at"),
    ("route writes the frame -> client first byte", "relayed_at", "first_byte"),
)
TOTALS = (
    ("TTFT at the client", "sent", "first_byte"),
    ("engine first token -> client first byte", "pool_first_token_at", "first_byte"),
)


@dataclass
class Traced:
    marks: dict[str, float]
    split: dict[str, float]

    def span(self, start: str, end: str) -> Optional[float]:
        a, b = self.marks.get(start), self.marks.get(end)
        return None if a is None or b is None else (b - a) * 1000

    def added_ms(self) -> Optional[float]:
        """TTFT at the client less the pool's own time (queue + engine)."""
        total = self.span("sent", "first_byte")
        pool = self.span("pool_admitted_at", "pool_first_token_at")
        return None if total is None or pool is None else total - pool


@dataclass
class Run:
    route: str
    concurrency: int
    samples: list[Traced] = field(default_factory=list)
    errors: int = 0


def _body(max_tokens: int, **extra: Any) -> dict[str, Any]:
    return dict({"max_tokens": max_tokens, "seed": SEED, "temperature": TEMPERATURE, "top_p": TOP_P}, **extra)


async def _first_token(chunks: Any, is_token: Callable[[Any], bool]) -> tuple[Optional[float], list[Any]]:
    """Read a stream to its end; the monotonic time of the chunk that carried the first token."""
    first, decoder, messages = None, sse_client.SSEDecoder(), []
    async for chunk in chunks:
        now = time.monotonic()
        arrived = decoder.feed(chunk)
        if first is None and any(is_token(message) for message in arrived):
            first = now
        messages += arrived
    return first, messages


def v1_call(conn: RawHttp, max_tokens: int, model: str) -> Callable[[], Awaitable[tuple[str, dict[str, float]]]]:
    body = json.dumps(_body(max_tokens, model=model, prompt=PROMPT, stream=True)).encode()

    def is_token(message: Any) -> bool:
        return message.data != sse_client.DONE and bool((message.payload().get("choices") or [{}])[0].get("text"))

    async def one() -> tuple[str, dict[str, float]]:
        sent = time.monotonic()
        status, chunks = await conn.stream("POST", "/v1/completions", body)
        first, messages = await _first_token(chunks, is_token)
        if status != 200 or first is None:
            raise RuntimeError(f"/v1/completions -> {status}: {[m.data for m in messages[:2]]}")
        return messages[0].payload()["id"].removeprefix("cmpl-"), {"sent": sent, "first_byte": first}

    return one


def v2_call(conn: RawHttp, max_tokens: int, model: str) -> Callable[[], Awaitable[tuple[str, dict[str, float]]]]:
    body = json.dumps(_body(max_tokens, model_ref=model, prompt=PROMPT, top_k=TOP_K)).encode()

    async def one() -> tuple[str, dict[str, float]]:
        sent = time.monotonic()
        for _ in range(50):  # 429 is retried after its backoff; bounded
            status, headers, payload = await conn.request("POST", "/v2/tasks", body)
            if status != 429:
                break
            await asyncio.sleep(int(headers.get("x-backoff-ms", "100")) / 1000)
        if status != 202:
            raise RuntimeError(f"POST /v2/tasks -> {status}: {payload[:200]!r}")
        task_id = json.loads(payload)["task_id"]
        status, chunks = await conn.stream("GET", f"/v2/tasks/{task_id}/events")
        first, messages = await _first_token(chunks, lambda m: m.event == "token")
        if status != 200 or first is None:
            raise RuntimeError(f"events -> {status}: {[m.data for m in messages[:2]]}")
        return task_id, {"sent": sent, "first_byte": first}

    return one


async def traced(conn: RawHttp, task_id: str, client_marks: dict[str, float]) -> Traced:
    status, _, payload = await conn.request("GET", f"/v2/tasks/{task_id}/trace")
    if status != 200:
        raise RuntimeError(f"trace of {task_id} -> {status}: {payload[:200]!r}")
    trace = json.loads(payload)
    marks = {k: v for k, v in trace["marks"].items() if v is not None}
    return Traced(dict(marks, **client_marks), trace.get("split_ms") or {})


async def run_level(port: int, route: str, concurrency: int, requests: int, max_tokens: int, model: str,
                    max_seconds: float) -> Run:
    """A closed loop of ``concurrency`` clients; each request's trace is read after its stream."""
    conns = [RawHttp(HOST, port) for _ in range(concurrency)]
    make = v1_call if route == "/v1/completions" else v2_call
    calls = [make(conn, max_tokens, model) for conn in conns]
    run, started = Run(route, concurrency), 0
    deadline = time.monotonic() + max_seconds

    async def client(worker: int) -> None:
        nonlocal started
        while started < requests and time.monotonic() < deadline:
            started += 1
            try:
                task_id, marks = await calls[worker]()
                run.samples.append(await traced(conns[worker], task_id, marks))
            except Exception as exc:
                run.errors += 1
                log(f"{route} c={concurrency}: {type(exc).__name__}: {exc}")

    try:
        await calls[0]()  # warm-up, not counted
        await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(concurrency))), max_seconds + 60)
    finally:
        for conn in conns:
            await conn.close()
    return run


def hop_rows(run: Run) -> list[list[Any]]:
    rows = []
    for name, start, end in HOPS + TOTALS:
        spans = [s for s in (t.span(start, end) for t in run.samples) if s is not None]
        if spans:
            stats = summary(spans)
            rows.append([name, len(spans), stats["p50"], stats["p99"]])
    added = [a for a in (t.added_ms() for t in run.samples) if a is not None]
    if added:
        stats = summary(added)
        rows.append(["added by the orchestrator (TTFT - queue - engine)", len(added), stats["p50"], stats["p99"]])
    for part in ("orchestrator", "queue", "engine"):
        values = [t.split[part] for t in run.samples if part in t.split]
        if values:
            stats = summary(values)
            rows.append([f"server's split: {part}", len(values), stats["p50"], stats["p99"]])
    return rows


def main() -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--levels", default=None, help="concurrency levels (default 1,8)")
    p.add_argument("--requests", type=int, default=None, help="requests per level and route")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--routes", default="/v1/completions,/v2/tasks")
    p.add_argument("--mock", action="store_true", help="a mock engine instead of SmolLM2")
    p.add_argument("--mock-ttft-ms", type=float, default=20.0)
    p.add_argument("--unbatched", action="store_true",
                   help="llama.cpp without continuous batching (engine_options batching: false)")
    p.add_argument("--direct-ingress", action="store_true", help="Serve's direct ingress (no proxy process)")
    add_serve_env_arg(p)
    p.add_argument("--slots", type=int, default=1, help="the SmolLM2 pool's slots (8: the home profile's batch)")
    p.add_argument("--threads", type=int, default=1, help="the SmolLM2 pool's llama.cpp threads")
    args = p.parse_args()
    banner("trace" + (" (direct ingress)" if args.direct_ingress else ""), args.quick)
    levels = [int(x) for x in args.levels.split(",")] if args.levels else ([1, 2] if args.quick else [1, 8])
    requests = args.requests or (4 if args.quick else 40)
    max_tokens = args.max_tokens or (4 if args.quick else 16)
    routes = [r for r in args.routes.split(",") if r]
    env = serve_env(args)
    if args.mock:
        pools = [mock_pool("traced", slots=1, capacity=256, tokens_per_s=200, first_token_ms=args.mock_ttft_ms)]
        model = "mock-model"
    else:
        options: dict[str, Any] = {"prefix_cache": False}
        if args.unbatched:
            options["batching"] = False
        pools = [smollm2_pool(threads=args.threads, slots=args.slots, capacity=256, ctx=2048, engine_options=options)]
        model = "smollm2"
    from bench.proxy_app import serve_app

    runs: list[Run] = []
    floor: dict[str, float] = {}
    with orchestrator(pools, name="bench-trace", num_cpus=4, direct_ingress=args.direct_ingress, ray_env=env,
                      extra_apps=[("/noop-app", serve_app())]) as orch:
        async def phase() -> None:
            for c in levels:
                for route in routes:
                    log(f"{route}: concurrency {c}, {requests} requests")
                    runs.append(await run_level(orch.port, route, c, max(requests, c), max_tokens,
                                                model if route == "/v2/tasks" or args.mock else "SmolLM2-135M-Instruct",
                                                120.0 if args.quick else 300.0))
            noop_port = find_direct_ingress_port("/noop-app/noop") if args.direct_ingress else orch.port
            floor.update(await platform_floor(noop_port, "/noop-app/noop", 20 if args.quick else 100))

        asyncio.run(phase())

    engine = "mock engine" if args.mock else (
        "SmolLM2-135M Q4_1, llama.cpp" + (" unbatched" if args.unbatched else "")
        + f", {args.slots} slot(s), {args.threads} thread(s)")
    mode = ingress_path(args)
    for run in runs:
        print_table(f"Hops of the first token, {run.route}, concurrency {run.concurrency} ({engine}, {mode}, ms)",
                    ["hop", "n", "p50", "p99"], hop_rows(run),
                    [f"errors: {run.errors}"] if run.errors else [])
    floor_ms = floor["noop_p50_ms"] + floor["actor_rtt_p50_ms"]
    print_table("Platform floor (ms, this run)", ["what", "p50", "p99"], [
        ["no-op POST through Serve's HTTP path", floor["noop_p50_ms"], floor["noop_p99_ms"]],
        ["Ray actor round trip", floor["actor_rtt_p50_ms"], floor["actor_rtt_p99_ms"]],
        ["floor (sum)", floor_ms, "-"],
    ])
    write_json(args.json, {"runs": [{"route": r.route, "concurrency": r.concurrency, "errors": r.errors,
                                     "samples": [{"marks": t.marks, "split": t.split} for t in r.samples]}
                                    for r in runs], "floor": floor})
    return 0 if all(r.samples and not r.errors for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
