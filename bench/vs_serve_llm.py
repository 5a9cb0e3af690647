"""The orchestrator's vLLM pool against Ray Serve LLM and against vLLM called directly.

The same SmolLM2 checkpoint (converted by scripts/setup_vllm.sh), the same vLLM build and
engine settings, the same sampling parameters and seed, streamed at each concurrency level:
(a) vLLM's AsyncLLM in this process (the orchestrator's own VllmEngine wrapper, no HTTP), (b)
``ray.serve.llm``'s ``build_openai_app`` (the peer users would pick instead), (c) this
orchestrator with one vLLM pool, both (b) and (c) through ``POST /v1/completions`` with
``stream: true`` over loopback. Each phase starts its own private Ray instance and loads the
model once; the table gives TTFT p50/p99, tokens/s per stream and in aggregate, and the
ratios orchestrator / Ray Serve LLM and each / direct.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (banner, fmt, fmt_ratio, orchestrator, parser, print_table, ray_start,  # noqa: E402
                    ray_stop, ratio, serve_start, write_json)
from overhead import (PROMPT, SEED, TEMPERATURE, TOP_K, TOP_P, Clients, Level, Sample, openai_caller,  # noqa: E402
                      run_levels)

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / ".runtime" / "models" / "smollm2-135m-hf"
CTX = 1024
ENGINE = {"max_model_len": CTX, "enforce_eager": True, "kv_cache_memory_bytes": 256 * 1024 * 1024}
DIRECT, ORCH, SERVE_LLM = "vLLM direct (AsyncLLM)", "orch vLLM pool /v1/completions", "Ray Serve LLM /v1/completions"


def missing() -> str | None:
    """Why this benchmark cannot run here (None: it can)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (scripts/setup_vllm.sh installs the CPU build)"
    if not (MODEL_DIR / "config.json").is_file():
        return f"the converted checkpoint {MODEL_DIR} is missing (scripts/setup_vllm.sh makes it)"
    if importlib.util.find_spec("pyarrow") is None:
        return "ray.serve.llm needs pyarrow (scripts/setup_vllm.sh installs it)"
    return None


async def direct_phase(levels: list[int], per_level: dict[int, int], max_tokens: int, max_seconds: float) -> list[Level]:
    from orch.engines.base import GenerationParams
    from orch.engines.vllm_engine import VllmEngine

    engine = VllmEngine(MODEL_DIR, slots=max(levels), ctx=CTX, engine_options=ENGINE)
    await asyncio.to_thread(engine.load)
    params = GenerationParams(max_tokens=max_tokens, seed=SEED, temperature=TEMPERATURE, top_p=TOP_P, top_k=TOP_K)

    async def one(worker: int) -> Sample:
        marks: list[float] = []
        parts: list[str] = []

        def emit(text: str) -> bool:
            marks.append(time.perf_counter())
            parts.append(text)
            return True

        started = time.perf_counter()
        await asyncio.to_thread(engine.generate, worker, PROMPT, params, emit)
        return Sample(marks[0] - started, len(marks), marks[-1] - marks[0], "".join(parts))

    try:
        return await run_levels(DIRECT, levels, per_level, lambda: one, max_seconds, one)
    finally:
        await asyncio.to_thread(engine.close)


async def http_phase(path: str, port: int, model: str, levels: list[int], per_level: dict[int, int],
                     max_tokens: int, max_seconds: float) -> list[Level]:
    clients = Clients(port, max(levels))
    payload = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "seed": SEED, "temperature": TEMPERATURE,
               "top_p": TOP_P}
    try:
        call = openai_caller(clients, "/v1/completions", payload)
        return await run_levels(path, levels, per_level, lambda: call, max_seconds, call)
    finally:
        await clients.close()


def serve_llm_phase(levels: list[int], per_level: dict[int, int], max_tokens: int, max_seconds: float) -> list[Level]:
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    ray_start(num_cpus=3)
    try:
        port = serve_start()
        config = LLMConfig(
            model_loading_config={"model_id": "smollm2", "model_source": str(MODEL_DIR)},
            engine_kwargs=dict(ENGINE, max_num_seqs=max(levels)),
            deployment_config={"num_replicas": 1},
            placement_group_config={"bundles": [{"CPU": 1}]},  # CPU build: no GPU bundle
        )
        serve.run(build_openai_app({"llm_configs": [config]}), name="serve-llm", route_prefix="/")
        return asyncio.run(http_phase(SERVE_LLM, port, "smollm2", levels, per_level, max_tokens, max_seconds))
    finally:
        ray_stop()


def orch_phase(levels: list[int], per_level: dict[int, int], max_tokens: int, max_seconds: float) -> list[Level]:
    pool = {"id": "vllm", "engine": "vllm", "model": f"file:{MODEL_DIR}", "model_aliases": ["smollm2"],
            "num_gpus": 0, "allow_cpu": True, "num_cpus": 1, "slots": max(levels), "ctx": CTX,
            "queue": {"capacity": 64, "policy": "reject"}, "engine_options": ENGINE}
    with orchestrator([pool], name="bench-vs-serve-llm", num_cpus=3, ready_timeout_s=300) as orch:
        return asyncio.run(http_phase(ORCH, orch.port, "smollm2", levels, per_level, max_tokens, max_seconds))


def main() -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--levels", default=None, help="concurrency levels, e.g. 1,8")
    args = p.parse_args()
    banner("vs Ray Serve LLM", args.quick)
    why = missing()
    if why:
        print(f"## Orchestrator vs Ray Serve LLM\n\nskipped: {why}\n")
        return 0
    max_tokens = args.max_tokens or (8 if args.quick else 64)
    levels = [int(x) for x in args.levels.split(",")] if args.levels else ([1, 2] if args.quick else [1, 8])
    per_level = {c: (max(2, c) if args.quick else max(16, 2 * c)) for c in levels}
    max_seconds = 60.0 if args.quick else 300.0

    results: list[Level] = []
    results += asyncio.run(direct_phase(levels, per_level, max_tokens, max_seconds))
    results += serve_llm_phase(levels, per_level, max_tokens, max_seconds)
    results += orch_phase(levels, per_level, max_tokens, max_seconds)

    rows = {(level.path, level.concurrency): level.row() for level in results}
    table = []
    for concurrency in levels:
        direct = rows[(DIRECT, concurrency)]
        peer = rows[(SERVE_LLM, concurrency)]
        for path in (DIRECT, SERVE_LLM, ORCH):
            row = rows[(path, concurrency)]
            table.append([path, concurrency, row["requests"], row["errors"], fmt(row["ttft_p50_ms"]),
                          fmt(row["ttft_p99_ms"]), fmt(row["tps_stream_p50"], 1), fmt(row["tps_aggregate"], 1),
                          fmt_ratio(ratio(row["ttft_p50_ms"], direct["ttft_p50_ms"])),
                          fmt_ratio(ratio(row["tps_aggregate"], direct["tps_aggregate"])),
                          fmt_ratio(ratio(row["ttft_p50_ms"], peer["ttft_p50_ms"])),
                          fmt_ratio(ratio(row["tps_aggregate"], peer["tps_aggregate"]))])
    print_table("Orchestrator vs Ray Serve LLM", [
        "path", "conc", "n", "err", "TTFT p50 ms", "TTFT p99 ms", "tok/s stream p50", "tok/s aggregate",
        "TTFT / direct", "agg tok/s / direct", "TTFT / Serve LLM", "agg tok/s / Serve LLM"], table, notes=[
        f"SmolLM2-135M (bf16, {MODEL_DIR.name}) on vLLM's CPU build, max_tokens {max_tokens}, seed {SEED}, "
        f"engine {ENGINE}; each path loads the model once in its own phase.",
        "Lower TTFT ratios and higher tok/s ratios are better for the row's path.",
    ])
    write_json(args.json, {"rows": list(rows.values())})
    errors = sum(level.errors for level in results)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
