"""Prefix-aware placement against least-loaded and round-robin, through the whole stack.

One orchestrator per placement policy (``server.placement``: prefix, least_loaded,
round_robin), each with the same pools:

- 4 mock-engine pools (2 slots each) whose first token waits ``PREFILL_MS`` per prompt word
  not in the engine's per-slot prefix cache (orch/engines/mock.py);
- 2 real llama.cpp pools (SmolLM2-135M, 2 slots each, batched engine, its own prefix cache).

Workloads, the same prompts for every policy (seeded), streamed over /v1/completions:

- multi-turn: conversations, each with its own long context, several turns each; a turn's
  prompt is the previous prompt, the reply streamed back, and a new question;
- shared-system: single-turn questions behind a few long system prompts;
- no-shared (mock pools only): unique prompts, where prefix routing has nothing to win and
  must cost nothing.

TTFT = from sending the request to the first streamed text, at the client. "hit" is the
pools' own estimate of prompt tokens found cached (``prefix_hit_tokens_total`` over hit +
miss, from /metrics). "vs least-loaded" = least-loaded's TTFT p50 / this policy's.

    python bench/prefix_routing.py [--quick] [--only mock|llamacpp] [--json out.json]
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    banner, fmt, fmt_ratio, log, mock_pool, orchestrator, parser, percentile, print_table, ratio, smollm2_pool,
    write_json,
)

POLICIES = ("prefix", "least_loaded", "round_robin")
PREFILL_MS = 0.5  # mock prefill per uncached prompt word
MOCK_MODEL, LLAMA_MODEL = "mock-model", "smollm2"
VOCAB = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact river garden window market letter engine signal bridge "
         "orange silver quiet rapid gentle simple honest narrow heavy bright").split()


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(count))


def plan(quick: bool, only: str = "") -> dict[str, Any]:
    if quick:
        return dict(mock=dict(conversations=4, turns=3, context=400, systems=2, shared=8, unique=8, concurrency=4),
                    llama=None)
    full = dict(mock=dict(conversations=8, turns=6, context=1200, systems=4, shared=48, unique=32, concurrency=8),
                llama=dict(conversations=4, turns=4, context=250, systems=2, shared=12, concurrency=4))
    if only:
        full["llama" if only == "mock" else "mock"] = None
    return full


class Client:
    def __init__(self, base: str) -> None:
        import httpx

        self.http = httpx.AsyncClient(base_url=base, timeout=120.0)

    async def complete(self, model: str, prompt: str, max_tokens: int) -> tuple[float, str]:
        """(TTFT seconds, the streamed text)."""
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0,
                "seed": 1}
        begin, first, text = time.perf_counter(), None, []
        async with self.http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code}: {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                piece = (chunk.get("choices") or [{}])[0].get("text") or ""
                if piece and first is None:
                    first = time.perf_counter() - begin
                text.append(piece)
        return (first if first is not None else float("nan")), "".join(text)

    async def hit_miss(self, prefix: str) -> tuple[float, float]:
        from prometheus_client.parser import text_string_to_metric_families

        body = (await self.http.get("/metrics")).text
        totals = {"prefix_hit_tokens": 0.0, "prefix_miss_tokens": 0.0}
        for family in text_string_to_metric_families(body):
            if family.name in totals:
                totals[family.name] += sum(s.value for s in family.samples
                                           if s.name.endswith("_total") and s.labels["pool_id"].startswith(prefix))
        return totals["prefix_hit_tokens"], totals["prefix_miss_tokens"]


async def multi_turn(client: Client, model: str, spec: dict[str, Any], seed: int, max_tokens: int) -> list[float]:
    rng = random.Random(seed)
    contexts = [f"Conversation {c}. Document: {words(rng, spec['context'])}\n" for c in range(spec["conversations"])]
    questions = [[words(rng, 12) for _ in range(spec["turns"])] for _ in contexts]
    gate = asyncio.Semaphore(spec["concurrency"])
    ttfts: list[float] = []

    async def conversation(index: int) -> None:
        prompt = contexts[index]
        for turn in range(spec["turns"]):
            prompt += f"User: {questions[index][turn]}\nAssistant:"
            async with gate:
                ttft, reply = await client.complete(model, prompt, max_tokens)
            ttfts.append(ttft)
            prompt += reply + "\n"

    await asyncio.gather(*(conversation(i) for i in range(len(contexts))))
    return ttfts


async def single_turns(client: Client, model: str, prompts: list[str], concurrency: int,
                       max_tokens: int) -> list[float]:
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt: str) -> float:
        async with gate:
            return (await client.complete(model, prompt, max_tokens))[0]

    return list(await asyncio.gather(*(one(p) for p in prompts)))


def shared_prompts(spec: dict[str, Any], seed: int) -> list[str]:
    rng = random.Random(seed)
    systems = [f"System {s}: you are agent {s}. Tools: {words(rng, spec['context'])}\n" for s in range(spec["systems"])]
    return [f"{systems[rng.randrange(len(systems))]}User: {words(rng, 12)}\nAssistant:" for _ in range(spec["shared"])]


def unique_prompts(spec: dict[str, Any], seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{n}: {words(rng, spec['context'] // 2)}\nAssistant:" for n in range(spec["unique"])]


async def run_policy(base: str, quick: bool, only: str = "") -> dict[str, dict[str, Any]]:
    spec = plan(quick, only)
    client = Client(base)
    out: dict[str, dict[str, Any]] = {}

    async def phase(name: str, pools: str, work) -> None:
        before = await client.hit_miss(pools)
        t0 = time.perf_counter()
        ttfts = [t for t in await work if t == t]
        after = await client.hit_miss(pools)
        hit, miss = after[0] - before[0], after[1] - before[1]
        out[name] = {"n": len(ttfts), "p50_ms": percentile(ttfts, 50) * 1000, "p90_ms": percentile(ttfts, 90) * 1000,
                     "hit": hit / (hit + miss) if hit + miss else float("nan"), "s": time.perf_counter() - t0}
        log(f"  {name}: {out[name]}")

    try:
        mock = spec["mock"]
        if mock is not None:
            await phase("mock multi-turn", "mock", multi_turn(client, MOCK_MODEL, mock, 11, 12))
            await phase("mock shared-system", "mock", single_turns(client, MOCK_MODEL, shared_prompts(mock, 12),
                                                                   mock["concurrency"], 12))
            await phase("mock no-shared", "mock", single_turns(client, MOCK_MODEL, unique_prompts(mock, 13),
                                                               mock["concurrency"], 12))
        llama = spec["llama"]
        if llama is not None:
            await phase("llama.cpp multi-turn", "llama", multi_turn(client, LLAMA_MODEL, llama, 21, 8))
            await phase("llama.cpp shared-system", "llama", single_turns(
                client, LLAMA_MODEL, shared_prompts(llama, 22), llama["concurrency"], 8))
    finally:
        await client.http.aclose()
    return out


def pools(quick: bool, only: str = "") -> list[dict[str, Any]]:
    mocks = [mock_pool(f"mock-{i}", slots=2, tokens_per_s=100, first_token_ms=5, prefill_ms_per_token=PREFILL_MS)
             for i in range(4)]
    if quick or only == "mock":
        return mocks
    llamas = [smollm2_pool(f"llama-{i}", threads=1, slots=2) for i in range(2)]
    return llamas if only == "llamacpp" else mocks + llamas


def main() -> int:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--only", choices=("mock", "llamacpp"), default="",
                     help="run one part: the mock pools or the two llama.cpp pools")
    args = cli.parse_args()
    banner("prefix_routing", args.quick)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for policy in POLICIES:
        log(f"policy {policy}")
        with orchestrator(pools(args.quick, args.only), name=f"prefix-{policy.replace('_', '-')}", num_cpus=4,
                          access_log=False, placement=policy) as orch:
            results[policy] = asyncio.run(run_policy(orch.base_url, args.quick, args.only))
    rows = []
    for phase in results["prefix"]:
        base = results["least_loaded"][phase]["p50_ms"]
        for policy in POLICIES:
            row = results[policy][phase]
            rows.append([phase, policy, row["n"], fmt(row["p50_ms"], 1), fmt(row["p90_ms"], 1),
                         "-" if row["hit"] != row["hit"] else f"{100 * row['hit']:.0f} %",
                         fmt_ratio(ratio(base, row["p50_ms"]))])
    notes = [] if args.only == "llamacpp" else [
        f"Mock pools: 4 x 2 slots, prefill {PREFILL_MS} ms per uncached prompt word, 100 tokens/s."]
    if args.quick:
        notes.append("Quick run: mock pools only, small workloads.")
    elif args.only != "mock":
        notes.append("llama.cpp pools: 2 x SmolLM2-135M Q4_1, 2 slots, 1 thread each, batched engine.")
    print_table("Prefix-aware placement", ["workload", "placement", "n", "TTFT p50 ms", "TTFT p90 ms", "hit",
                                           "vs least-loaded (p50)"], rows, notes)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
