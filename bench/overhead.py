"""Orchestrator overhead against the bare engine, on the same SmolLM2 GGUF, seed and parameters.

Paths, measured one after another in the same run (nothing else of ours running meanwhile):

- bare: llama-cpp-python in this process, ONE ``Llama`` (2 threads) serving requests one
  after another from a FIFO (the orchestrator's home pool also has one slot); the C client
  coroutines are the same closed loop as for the HTTP paths, but with no HTTP at all.
  Measured first and again last, to bracket drift on a shared machine.
- pool in process (no Ray, no HTTP): the pool actor's own code (``PoolManager``) hosting
  the same engine in this process, its events read through ``poll`` as the ingress reads
  them. Between bare and this row: what the pool code costs; between this row and the HTTP
  rows: what Ray's processes, Serve and HTTP cost.
- orch /v2/tasks: ``POST /v2/tasks`` then ``GET /v2/tasks/{id}/events`` (SSE) through Ray
  Serve, pool = configs/home.yaml's (llama.cpp, one slot) with ``prefix_cache: false``, so
  every generation starts from a clean context, as bare's does: the same work.
- orch /v1/completions and /v1/chat/completions (stream): only if those routes answer
  (404 -> column skipped with a note). Chat renders a template, so its prompt differs.
- orch /v1/chat/completions, prefix cache: the same chat request on a second pool that
  keeps its prompt-prefix cache (the engine's default): the templated system prompt is
  evaluated once, not per request.
- llama_cpp.server: llama-cpp-python's own OpenAI server (``python -m llama_cpp.server``,
  the ``llama-cpp-python[server]`` extras) on a free loopback port, ``/v1/completions``
  streaming, and ``/v1/chat/completions`` (the peer of the orchestrator's chat column);
  skipped with a note when the extras are missing. It keeps the previous request's KV
  cache and skips the prompt it already holds, like the prefix-cache pool.
- platform floor: one no-op POST through Serve's HTTP path and one Ray actor call round
  trip, the least any Serve app with its engine in another actor adds to the TTFT.

TTFT is from the client's request start to its first token; per-stream tokens/s is
(tokens - 1) / (last token - first token); aggregate tokens/s is all tokens over the wall
time of the level. Ratios are path / bare (mean of the two bare runs).

    python bench/overhead.py [--quick] [--max-tokens 64] [--levels 1,8,32]
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    HOST,
    RawHttp,
    banner,
    fmt_ratio,
    find_direct_ingress_port,
    free_port,
    log,
    mock_pool,
    orchestrator,
    parser,
    print_table,
    ratio,
    smollm2_path,
    smollm2_pool,
    subprocess_server,
    summary,
    write_json,
)
from orch.api import sse_client  # noqa: E402

PROMPT = "Once upon a time"
SEED = 1234
TEMPERATURE, TOP_P, TOP_K = 0.8, 0.95, 40
CTX = 2048
#: The measured pool runs the engine bare runs (llama-cpp-python's ``Llama``, one context per
#: slot), each generation from a clean context as bare does; the batched engine is measured
#: against llama.cpp's own server in vs_llama_server.py.
SAME_ENGINE_AS_BARE = {"batching": False, "prefix_cache": False}
ZERO_PATH = "orch /v2/tasks, mock engine (0 ms)"
IN_PROCESS = "pool in process (no Ray, no HTTP)"
CACHED_MODEL = "smollm2-cached"
CACHED_CHAT = "orch /v1/chat/completions, prefix cache"
#: The bare engine measured while Ray and the orchestrator are up and idle, right before the
#: orchestrator's rows of the same level: their baseline.
BESIDE = "bare (beside orch)"


@dataclass
class Sample:
    ttft_s: float
    tokens: int
    decode_s: float  # first token -> last token
    text: str = ""
    post_s: float = float("nan")  # /v2/tasks: request start -> 202
    first_chunk_s: float = float("nan")  # /v2/tasks: request start -> first SSE chunk (the started event)


@dataclass
class Level:
    path: str
    concurrency: int
    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0
    errors: int = 0

    def row(self) -> dict[str, Any]:
        ttft = summary([s.ttft_s * 1000 for s in self.samples])
        per_stream = [(s.tokens - 1) / s.decode_s for s in self.samples if s.tokens > 1 and s.decode_s > 0]
        total = sum(s.tokens for s in self.samples)
        return {
            "path": self.path, "concurrency": self.concurrency, "requests": len(self.samples), "errors": self.errors,
            "ttft_p50_ms": ttft["p50"], "ttft_p99_ms": ttft["p99"],
            "tps_stream_p50": summary(per_stream)["p50"],
            "tps_aggregate": total / self.wall_s if self.wall_s else float("nan"),
            "tokens_mean": total / len(self.samples) if self.samples else 0,
        }


async def closed_loop(path: str, concurrency: int, requests: int, one: Callable[[int], Awaitable[Sample]],
                      max_seconds: float) -> Level:
    """``concurrency`` clients, each sending its next request when its previous one ended,
    until ``requests`` were sent or ``max_seconds`` passed."""
    level = Level(path, concurrency)
    started = 0
    t0 = time.perf_counter()
    deadline = t0 + max_seconds

    async def client(worker: int) -> None:
        nonlocal started
        while started < requests and time.perf_counter() < deadline:
            started += 1
            try:
                level.samples.append(await one(worker))
            except Exception as exc:
                level.errors += 1
                log(f"{path}: request failed: {type(exc).__name__}: {exc}")

    await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(concurrency))), max_seconds + 120)
    level.wall_s = time.perf_counter() - t0
    return level


# -- bare --------------------------------------------------------------------------------
class Bare:
    """One Llama, one engine thread: requests run one after another, FIFO."""

    def __init__(self, max_tokens: int, threads: int) -> None:
        import llama_cpp

        self.max_tokens = max_tokens
        self.llm = llama_cpp.Llama(model_path=smollm2_path(), n_ctx=CTX, n_threads=threads,
                                   n_threads_batch=threads, verbose=False)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bare-engine")

    def _generate(self, t_start: float) -> Sample:
        llm = self.llm
        llm.reset()  # as the orchestrator's engine does: a clean context per generation
        first = last = None
        tokens = 0
        parts = []
        stream = llm.create_completion(PROMPT, max_tokens=self.max_tokens, temperature=TEMPERATURE, top_p=TOP_P,
                                       top_k=TOP_K, seed=SEED, stream=True)
        for chunk in stream:
            text = chunk["choices"][0]["text"]
            if text:
                now = time.perf_counter()
                if first is None:
                    first = now
                last = now
                tokens += 1
                parts.append(text)
        assert first is not None and last is not None
        return Sample(first - t_start, tokens, last - first, "".join(parts))

    async def one(self, worker: int) -> Sample:
        t_start = time.perf_counter()
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._generate, t_start)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.llm.close()


class PoolInProcess:
    """The pool's own code with no Ray and no HTTP: a PoolManager (the class the pool actor
    wraps) hosting the same engine in this process, its task events read through ``poll`` as
    the ingress reads them. The gap between this row and bare is what the pool code costs;
    the gap between it and the HTTP rows is what Ray's processes, Serve and HTTP cost."""

    def __init__(self, pool: dict[str, Any], max_tokens: int) -> None:
        from orch.config import parse_config

        self.config = parse_config({"version": 1, "pools": [pool]}, "overhead in process").pools[0]
        self.max_tokens = max_tokens
        self.manager: Any = None
        self.count = 0

    async def start(self) -> None:
        from orch.pools.manager import PoolManager

        self.manager = PoolManager(self.config)
        await self.manager.start()

    async def stop(self) -> None:
        if self.manager is not None:
            await self.manager.stop()

    async def one(self, worker: int) -> Sample:
        from orch.api.tasks import TaskRequest

        self.count += 1
        task_id = f"inproc-{self.count}"
        t_start = time.perf_counter()
        request = TaskRequest(prompt=PROMPT, max_tokens=self.max_tokens, seed=SEED, temperature=TEMPERATURE,
                              top_p=TOP_P, top_k=TOP_K)
        admitted = await self.manager.submit(request, task_id)
        if admitted.error is not None:
            raise RuntimeError(f"in-process submit refused: {admitted.error}")
        cursor, first, last, parts = 0, None, None, []
        for _ in range(100_000):  # bounded: a stream of max_tokens tokens ends long before
            batch = await self.manager.poll(task_id, cursor, 15.0)
            now = time.perf_counter()
            for index, kind, data in batch.events:
                cursor = index + 1
                if kind == "token":
                    first = first or now
                    last = now
                    parts.append(data["t"])
                elif kind == "error":
                    raise RuntimeError(f"in-process task failed: {data}")
            if batch.done:
                break
        assert first is not None and last is not None
        return Sample(first - t_start, len(parts), last - first, "".join(parts))


async def platform_floor(port: int, noop_path: str, n: int) -> dict[str, float]:
    """What any Serve app whose work runs in another actor pays on this machine: one request
    through Serve's HTTP path to a no-op route, and one Ray actor call round trip (an async
    actor, called from asyncio as the ingress calls the pool), each ``n`` times."""
    import ray

    @ray.remote(num_cpus=0)
    class Echo:
        async def echo(self, value: int) -> int:
            return value

    echo = Echo.remote()
    await echo.echo.remote(0)
    calls = []
    for i in range(n):
        t = time.perf_counter()
        await echo.echo.remote(i)
        calls.append((time.perf_counter() - t) * 1000)
    ray.kill(echo)
    conn = RawHttp(HOST, port)
    requests = []
    try:
        await conn.request("POST", noop_path, b"{}")
        for _ in range(n):
            t = time.perf_counter()
            status, _, _ = await conn.request("POST", noop_path, b"{}")
            if status != 202:
                raise RuntimeError(f"no-op POST -> {status}")
            requests.append((time.perf_counter() - t) * 1000)
    finally:
        await conn.close()
    noop, rtt = summary(requests), summary(calls)
    return {"noop_p50_ms": noop["p50"], "actor_rtt_p50_ms": rtt["p50"],
            "noop_p99_ms": noop["p99"], "actor_rtt_p99_ms": rtt["p99"]}


# -- HTTP clients ------------------------------------------------------------------------
class Clients:
    def __init__(self, port: int, n: int) -> None:
        self.conns = [RawHttp(HOST, port) for _ in range(n)]

    async def close(self) -> None:
        for c in self.conns:
            await c.close()


def v2_caller(clients: Clients, max_tokens: int, model_ref: str = "smollm2") -> Callable[[int], Awaitable[Sample]]:
    body = json.dumps({"prompt": PROMPT, "max_tokens": max_tokens, "seed": SEED, "temperature": TEMPERATURE,
                       "top_p": TOP_P, "top_k": TOP_K, "model_ref": model_ref}).encode()

    async def one(worker: int) -> Sample:
        conn = clients.conns[worker]
        t_start = time.perf_counter()
        for _ in range(50):  # 429 (queue full) is retried after its backoff; bounded
            status, hdrs, payload = await conn.request("POST", "/v2/tasks", body)
            if status != 429:
                break
            await asyncio.sleep(int(hdrs.get("x-backoff-ms", "100")) / 1000)
        if status != 202:
            raise RuntimeError(f"POST /v2/tasks -> {status}: {payload[:200]!r}")
        t_202 = time.perf_counter()
        task_id = json.loads(payload)["task_id"]
        status, chunks = await conn.stream("GET", f"/v2/tasks/{task_id}/events")
        if status != 200:
            raise RuntimeError(f"events -> {status}")
        first = last = first_chunk = None
        decoder, messages = sse_client.SSEDecoder(), []
        async for chunk in chunks:
            now = time.perf_counter()
            if first_chunk is None:
                first_chunk = now
            arrived = decoder.feed(chunk)
            if any(message.event == "token" for message in arrived):
                if first is None:
                    first = now
                last = now
            messages += arrived
        tokens, parts = 0, []
        for message in messages:  # decoded after the stream, outside the timed part
            if message.event == "token":
                tokens += 1
                parts.append(message.payload()["t"])
            elif message.event == "error":
                raise RuntimeError(message.data)
        assert first is not None and last is not None and first_chunk is not None, messages[:3]
        return Sample(first - t_start, tokens, last - first, "".join(parts), t_202 - t_start, first_chunk - t_start)

    return one


def openai_caller(clients: Clients, route: str, payload: dict[str, Any]) -> Callable[[int], Awaitable[Sample]]:
    body = json.dumps(dict(payload, stream=True)).encode()
    chat = "chat" in route

    async def one(worker: int) -> Sample:
        conn = clients.conns[worker]
        t_start = time.perf_counter()
        status, chunks = await conn.stream("POST", route, body)
        if status != 200:
            rest = b"".join([c async for c in chunks])
            raise RuntimeError(f"POST {route} -> {status}: {rest[:300]!r}")
        first = last = None
        tokens = 0
        parts = []
        decoder = sse_client.SSEDecoder()
        async for chunk in chunks:
            now = time.perf_counter()
            for message in decoder.feed(chunk):
                if message.data == sse_client.DONE:
                    continue
                data = message.payload()
                if "error" in data:
                    raise RuntimeError(str(data["error"])[:300])
                choices = data.get("choices") or [{}]
                piece = (choices[0].get("delta") or {}).get("content") if chat else choices[0].get("text")
                if piece:
                    if first is None:
                        first = now
                    last = now
                    tokens += 1
                    parts.append(piece)
        assert first is not None and last is not None
        return Sample(first - t_start, tokens, last - first, "".join(parts))

    return one


async def probe(port: int, route: str, payload: dict[str, Any]) -> Optional[str]:
    """None when the route streams; otherwise why the column is skipped."""
    conn = RawHttp(HOST, port)
    try:
        status, chunks = await conn.stream("POST", route, json.dumps(dict(payload, stream=True, max_tokens=2)).encode())
        rest = b"".join([c async for c in chunks])
    finally:
        await conn.close()
    if status == 404 and b"model" not in rest:
        return f"{route} answers 404 (route not there yet)"
    if status != 200:
        return f"{route} answers {status}: {rest[:160].decode(errors='replace')}"
    return None


# -- phases ------------------------------------------------------------------------------
async def run_levels(path: str, levels: list[int], per_level: dict[int, int], make_one: Callable[[], Any],
                     max_seconds: float, warmup: Callable[[int], Awaitable[Sample]]) -> list[Level]:
    await warmup(0)
    out = []
    for c in levels:
        log(f"{path}: concurrency {c}, {per_level[c]} requests")
        out.append(await closed_loop(path, c, per_level[c], make_one(), max_seconds))
    return out


def main() -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--levels", default=None, help="concurrency levels, e.g. 1,8,32")
    p.add_argument("--no-peer", action="store_true", help="skip llama_cpp.server")
    p.add_argument("--direct-ingress", action="store_true",
                   help="Serve's experimental direct ingress (the replica serves HTTP, no proxy)")
    p.add_argument("--threads", type=int, default=1,
                   help="llama.cpp threads on every path (default 1: with 2 threads on a 2-core machine "
                        "llama.cpp's spinning thread barrier collapses under any competing load)")
    args = p.parse_args()
    banner("overhead" + (" (direct ingress)" if args.direct_ingress else ""), args.quick)
    threads = args.threads
    max_tokens = args.max_tokens or (8 if args.quick else 64)
    levels = [int(x) for x in args.levels.split(",")] if args.levels else ([1, 4] if args.quick else [1, 8, 32])
    per_level = {c: (max(2, c) if args.quick else max(16, 2 * c)) for c in levels}
    max_seconds = 60.0 if args.quick else 300.0
    results: list[Level] = []
    breakdown: list[Level] = []
    floor: dict[str, float] = {}
    zero_n = 10 if args.quick else 100
    notes: list[str] = []
    texts: dict[str, str] = {}

    # 1. bare, first run
    bare = Bare(max_tokens, threads)
    try:
        async def bare_phase(label: str) -> list[Level]:
            return await run_levels(label, levels, per_level, lambda: bare.one, max_seconds, bare.one)

        bare_a = asyncio.run(bare_phase("bare (first)"))
        results += bare_a
        texts["bare"] = bare_a[0].samples[0].text

        # 1b. the pool's code in this process (no Ray, no HTTP), same engine settings as bare
        capacity = max(64, 2 * max(levels))

        async def in_process_phase() -> list[Level]:
            pool = PoolInProcess(smollm2_pool(threads=threads, capacity=capacity, ctx=CTX,
                                              engine_options=SAME_ENGINE_AS_BARE), max_tokens)
            await pool.start()
            try:
                return await run_levels(IN_PROCESS, levels, per_level, lambda: pool.one, max_seconds, pool.one)
            finally:
                await pool.stop()

        in_process = asyncio.run(in_process_phase())
        results += in_process
        texts[IN_PROCESS] = in_process[0].samples[0].text if in_process[0].samples else ""

        # 2. orchestrator
        # The measured pool starts every generation from a clean context, as bare does (the
        # same work); a second one keeps its prompt-prefix cache (the default) for the chat
        # route, whose templated prompt shares its system part between requests.
        pools = [smollm2_pool(threads=threads, capacity=capacity, ctx=CTX, engine_options=SAME_ENGINE_AS_BARE),
                 smollm2_pool("cached", threads=threads, capacity=capacity, ctx=CTX, num_cpus=0.5,
                              model_aliases=[CACHED_MODEL], engine_options={"batching": False}),
                 mock_pool("zero", slots=1, capacity=64, tokens_per_s=0)]
        from bench.proxy_app import serve_app

        with orchestrator(pools, name="bench-overhead", num_cpus=4, direct_ingress=args.direct_ingress,
                          extra_apps=[("/noop-app", serve_app())]) as orch:
            async def orch_phase() -> list[Level]:
                """Interleaved per level: the bare engine (Ray up, orchestrator idle), then each
                orchestrator route, so every orchestrator row has a baseline measured seconds
                before it under the same machine load."""
                clients = Clients(orch.port, max(levels))
                try:
                    v2 = v2_caller(clients, max_tokens)
                    await v2(0)  # warm-up
                    calls: list[tuple[str, Callable[[int], Awaitable[Sample]]]] = [("orch /v2/tasks", v2)]
                    common = {"model": "SmolLM2-135M-Instruct", "max_tokens": max_tokens, "seed": SEED,
                              "temperature": TEMPERATURE, "top_p": TOP_P}
                    chat = dict(common, messages=[{"role": "user", "content": PROMPT}])
                    for path, route, payload in (
                        ("orch /v1/completions", "/v1/completions", dict(common, prompt=PROMPT)),
                        ("orch /v1/chat/completions", "/v1/chat/completions", chat),
                        (CACHED_CHAT, "/v1/chat/completions", dict(chat, model=CACHED_MODEL)),
                    ):
                        why = await probe(orch.port, route, payload)
                        if why:
                            notes.append(f"{path}: skipped, {why}.")
                            continue
                        call = openai_caller(clients, route, payload)
                        await call(0)
                        calls.append((path, call))
                    await bare.one(0)
                    out = []
                    for c in levels:
                        for path, call in [(BESIDE, bare.one)] + calls:
                            log(f"{path}: concurrency {c}, {per_level[c]} requests")
                            lvl = await closed_loop(path, c, per_level[c], call, max_seconds)
                            out.append(lvl)
                            if c == levels[0] and lvl.samples and path != BESIDE:
                                texts[path] = lvl.samples[0].text
                    # The same route on a mock engine that answers at once: the orchestrator's own TTFT.
                    zero = v2_caller(clients, max_tokens, model_ref="mock-model")
                    await zero(0)
                    log(f"orch /v2/tasks, mock engine: concurrency 1, {zero_n} requests")
                    breakdown.append(await closed_loop(ZERO_PATH, 1, zero_n, zero, max_seconds))
                    noop_port = orch.port
                    if args.direct_ingress:
                        noop_port = find_direct_ingress_port("/noop-app/noop")
                    log(f"platform floor: {zero_n} no-op requests, {zero_n} actor calls")
                    floor.update(await platform_floor(noop_port, "/noop-app/noop", zero_n))
                    return out
                finally:
                    await clients.close()

            results += asyncio.run(orch_phase())

        # 3. llama_cpp.server peer
        missing = [m for m in ("sse_starlette", "pydantic_settings", "starlette_context", "fastapi", "uvicorn")
                   if importlib.util.find_spec(m) is None]
        if args.no_peer:
            notes.append("llama_cpp.server: skipped (--no-peer).")
        elif missing:
            notes.append(f"llama_cpp.server: skipped, the llama-cpp-python[server] extras are missing ({', '.join(missing)}); "
                         "pip install -e '.[bench]'.")
        else:
            port = free_port()
            cmd = [sys.executable, "-m", "llama_cpp.server", "--model", smollm2_path(), "--host", HOST, "--port",
                   str(port), "--n_ctx", str(CTX), "--n_threads", str(threads), "--n_threads_batch", str(threads),
                   "--verbose", "False", "--interrupt_requests", "False"]
            with subprocess_server(cmd, ready_url=f"http://{HOST}:{port}/v1/models", timeout_s=120):
                async def peer_phase() -> list[Level]:
                    clients = Clients(port, max(levels))
                    # The server's own defaults differ from Llama.create_completion's
                    # (repeat_penalty 1.1): send Llama's, so the sampling is the same.
                    payload = {"prompt": PROMPT, "max_tokens": max_tokens, "seed": SEED, "temperature": TEMPERATURE,
                               "top_p": TOP_P, "top_k": TOP_K, "min_p": 0.05, "repeat_penalty": 1.0}
                    try:
                        call = openai_caller(clients, "/v1/completions", payload)
                        out = await run_levels("llama_cpp.server", levels, per_level, lambda: call, max_seconds, call)
                        texts["llama_cpp.server"] = out[0].samples[0].text if out[0].samples else ""
                        # Chat through the server's own rendering of the GGUF's template: the peer
                        # of the orchestrator's chat route (same longer, templated prompt).
                        chat_payload = {k: v for k, v in payload.items() if k != "prompt"}
                        chat_payload["messages"] = [{"role": "user", "content": PROMPT}]
                        chat = openai_caller(clients, "/v1/chat/completions", chat_payload)
                        out += await run_levels("llama_cpp.server chat", levels, per_level, lambda: chat,
                                                max_seconds, chat)
                        return out
                    finally:
                        await clients.close()

                try:
                    results += asyncio.run(peer_phase())
                except Exception as exc:  # report what was measured; say what failed
                    log(f"llama_cpp.server phase failed: {type(exc).__name__}: {exc}")
                    notes.append(f"llama_cpp.server: phase failed ({type(exc).__name__}: {exc}); its rows are missing.")

        # 4. bare again
        bare_b = asyncio.run(bare_phase("bare (last)"))
        results += bare_b
    finally:
        bare.close()

    rows = [lvl.row() for lvl in results]
    keys = ("ttft_p50_ms", "ttft_p99_ms", "tps_aggregate", "tps_stream_p50")
    base, beside = {}, {}
    for c in levels:
        pair = [r for r in rows if r["path"] in ("bare (first)", "bare (last)") and r["concurrency"] == c]
        base[c] = {k: sum(r[k] for r in pair) / len(pair) for k in keys}
        near = [r for r in rows if r["path"] == BESIDE and r["concurrency"] == c]
        beside[c] = {k: near[0][k] for k in keys} if near else base[c]

    def baseline(r: dict[str, Any]) -> dict[str, float]:
        return beside[r["concurrency"]] if r["path"].startswith("orch") else base[r["concurrency"]]

    order = {"bare (first)": 0, "bare (last)": 1, IN_PROCESS: 1.5, BESIDE: 3}
    table = []
    for r in sorted(rows, key=lambda r: (r["concurrency"], order.get(r["path"], 2 if "llama_cpp" in r["path"] else 4),
                                         r["path"])):
        b = baseline(r)
        table.append([
            r["path"], r["concurrency"], f"{r['requests']}" + (f" ({r['errors']} err)" if r["errors"] else ""),
            r["tokens_mean"], r["ttft_p50_ms"], r["ttft_p99_ms"], r["ttft_p50_ms"] - b["ttft_p50_ms"],
            fmt_ratio(ratio(r["ttft_p50_ms"], b["ttft_p50_ms"])), r["tps_stream_p50"], r["tps_aggregate"],
            fmt_ratio(ratio(r["tps_aggregate"], b["tps_aggregate"])),
        ])
    same = {k: ("same" if v == texts.get("bare") else "differs") for k, v in texts.items() if k != "bare"}
    drift = {c: ratio(next(r["tps_aggregate"] for r in rows if r["path"] == "bare (last)" and r["concurrency"] == c),
                      next(r["tps_aggregate"] for r in rows if r["path"] == "bare (first)" and r["concurrency"] == c))
             for c in levels}
    print_table(
        f"Overhead against the bare engine (SmolLM2-135M Q4_1, {threads} threads, max_tokens {max_tokens}, "
        f"seed {SEED}, prompt {PROMPT!r})",
        ["path", "conc", "requests", "tokens/req", "TTFT p50 ms", "TTFT p99 ms", "added TTFT p50 ms",
         "TTFT p50 ratio", "tok/s per stream p50", "tok/s aggregate", "aggregate ratio"],
        table,
        notes=notes + [
            "Baselines: orch rows against 'bare (beside orch)' of the same level (measured just before them, Ray up "
            "and idle); the other rows against the mean of 'bare (first)' and 'bare (last)' (Ray down). "
            "Bare drift last/first, aggregate tok/s: "
            + ", ".join(f"c={c}: {fmt_ratio(d)}" for c, d in drift.items()) + ".",
            "Generated text vs bare (same seed): " + (", ".join(f"{k}: {v}" for k, v in same.items()) or "-") + ".",
        ],
    )
    c1_v2 = [lvl for lvl in results if lvl.path == "orch /v2/tasks" and lvl.concurrency == 1]
    brows = []
    for lvl in c1_v2 + breakdown:
        post = summary([x.post_s * 1000 for x in lvl.samples])
        chunk = summary([x.first_chunk_s * 1000 for x in lvl.samples])
        ttft = summary([x.ttft_s * 1000 for x in lvl.samples])
        brows.append([lvl.path, len(lvl.samples), post["p50"], chunk["p50"], ttft["p50"], post["p99"], chunk["p99"],
                      ttft["p99"]])
    if 1 in beside:
        brows.append([BESIDE, "-", "-", "-", beside[1]["ttft_p50_ms"], "-", "-", beside[1]["ttft_p99_ms"]])
    print_table("Where the TTFT goes at concurrency 1 (/v2/tasks, client-side marks from the request start, ms)",
                ["path", "requests", "202 p50", "1st SSE chunk p50", "1st token p50", "202 p99", "1st chunk p99",
                 "1st token p99"], brows,
                notes=["'202' = POST /v2/tasks answered; '1st SSE chunk' = the GET's first bytes (the started "
                       "event); with the mock engine the first token follows the started event in the same batch, "
                       "so its TTFT is the orchestrator's own cost: two HTTP requests through Serve, the submit "
                       "and poll actor calls."])
    c1 = beside.get(1)
    targets = []
    added_at_1 = {}
    if c1:
        for path in ("orch /v2/tasks", "orch /v1/completions"):
            row = next((r for r in rows if r["path"] == path and r["concurrency"] == 1), None)
            if row:
                added = added_at_1[path] = row["ttft_p50_ms"] - c1["ttft_p50_ms"]
                targets.append([f"added TTFT p50 at c=1 ({path})", "<= 3 ms", f"{added:.2f} ms",
                                "holds" if added <= 3 else "does not hold"])
    if floor:
        one_request = floor["noop_p50_ms"] + floor["actor_rtt_p50_ms"]
        print_table("Platform floor at concurrency 1 (ms, this run)", ["what", "p50", "p99"], [
            ["one no-op POST through Serve's HTTP path", floor["noop_p50_ms"], floor["noop_p99_ms"]],
            ["one Ray actor call round trip (async actor, from asyncio)", floor["actor_rtt_p50_ms"],
             floor["actor_rtt_p99_ms"]],
            ["floor of a one-request route: no-op request + one round trip", one_request, "-"],
        ] + [[f"measured: added TTFT of {path}", added, "-"] for path, added in added_at_1.items()], notes=[
            "Any Serve app whose engine runs in another actor pays at least the HTTP path into its replica and "
            "back plus one actor round trip (the request there, the first token back) on top of the engine's "
            "own TTFT. /v2/tasks takes two HTTP requests (POST, then GET of the events)."])
    top = max(levels)
    v2top = next((r for r in rows if r["path"] == "orch /v2/tasks" and r["concurrency"] == top), None)
    if v2top:
        agg = ratio(v2top["tps_aggregate"], beside[top]["tps_aggregate"])
        targets.append([f"aggregate tok/s at c={top} vs bare", ">= 0.98x", fmt_ratio(agg),
                        "holds" if agg >= 0.98 else "does not hold"])
    print_table("Overhead targets", ["target", "wanted", "measured", "verdict"], targets)
    write_json(args.json, {"rows": rows, "notes": notes, "texts": texts, "floor": floor})
    return 0


if __name__ == "__main__":
    sys.exit(main())
