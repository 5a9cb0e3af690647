"""The orchestrator's llama.cpp pool against llama.cpp's own ``llama-server``.

Same GGUF (SmolLM2-135M-Instruct Q4_1), same llama.cpp version (llama-server is built from the
source vendored in the installed llama-cpp-python's sdist by scripts/build_llama_server.sh),
one server at a time on this machine, and the same client: vLLM's benchmark client
(``vllm.benchmarks.serve``), unmodified, run as a library, on ``/v1/completions`` with random
prompts. llama-server runs with ``-np SLOTS -t THREADS``; the orchestrator with one pool of
SLOTS slots with continuous batching (``engine_options: {batching: true}``) and THREADS threads.
The table gives both servers' aggregate output tok/s, TTFT p50 and TPOT p50 per level, their
ratios (orchestrator / llama-server) and failed requests; ``--json`` writes them per level.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (HOST, banner, fmt, fmt_ratio, free_port, log, orchestrator, parser, print_table,  # noqa: E402
                    ratio, smollm2_path, smollm2_pool, subprocess_server, write_json)

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = ROOT / ".runtime" / "models" / "smollm2-135m-hf"
BUILD_SCRIPT = ROOT / "scripts" / "build_llama_server.sh"
LLAMA_SERVER, ORCH = "llama-server", "orchestrator"
MODEL_NAME = "smollm2"
CTX = 2048
TEMPERATURE = 0.8
SEED = 0


@dataclass(frozen=True)
class Level:
    concurrency: int
    input_len: int
    output_len: int
    prompts: int

    @property
    def name(self) -> str:
        return f"c={self.concurrency} in={self.input_len} out={self.output_len}"


def levels(quick: bool) -> list[Level]:
    if quick:
        return [Level(1, 16, 8, 2), Level(4, 16, 8, 8)]
    return [Level(1, 64, 64, 16), Level(8, 64, 64, 32), Level(32, 64, 64, 64), Level(8, 512, 64, 32)]


def missing() -> Optional[str]:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "vLLM's benchmark client is not installed (scripts/setup_vllm.sh installs vLLM's CPU build)"
    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        return f"the client's tokenizer {TOKENIZER_DIR} is missing (scripts/setup_vllm.sh makes it)"
    return None


def find_llama_server(build: bool) -> Optional[str]:
    """A llama-server binary: $LLAMA_SERVER, an earlier build, one on PATH, or (``build``) a new build."""
    for candidate in (os.environ.get("LLAMA_SERVER"), str(ROOT / ".runtime" / "llama-server" / "llama-server"),
                      shutil.which("llama-server")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    if not build:
        return None
    log("building llama-server (several minutes on 2 cores)")
    done = subprocess.run(["bash", str(BUILD_SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"building llama-server failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def run_client(base_url: str, level: Level) -> dict[str, Any]:
    """vLLM's benchmark client at one level, as ``vllm bench serve`` would run it."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    client_parser = FlexibleArgumentParser()
    add_cli_args(client_parser)
    args = client_parser.parse_args([
        "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions",
        "--model", MODEL_NAME, "--tokenizer", str(TOKENIZER_DIR), "--dataset-name", "random",
        "--random-input-len", str(level.input_len), "--random-output-len", str(level.output_len),
        "--num-prompts", str(level.prompts), "--max-concurrency", str(level.concurrency),
        "--request-rate", "inf", "--temperature", str(TEMPERATURE), "--seed", str(SEED),
        "--percentile-metrics", "ttft,tpot,itl", "--disable-tqdm", "--ready-check-timeout-sec", "0",
    ])
    result = main(args)
    completed = int(result.get("completed", 0))
    nothing = float("nan") if completed == 0 else None  # no latency to report when every request failed
    return {
        "completed": completed,
        "failed": int(result.get("failed", level.prompts - completed)),
        "tok_s": float(result.get("output_throughput", 0.0)),
        "ttft_p50_ms": nothing or float(result.get("median_ttft_ms", float("nan"))),
        "tpot_p50_ms": nothing or float(result.get("median_tpot_ms", float("nan"))),
    }


def llama_server_phase(binary: str, slots: int, threads: int, plan: list[Level]) -> dict[str, dict[str, Any]]:
    port = free_port()
    args = [binary, "-m", smollm2_path(), "--host", HOST, "--port", str(port), "-np", str(slots),
            "-t", str(threads), "-c", str(slots * CTX), "-a", MODEL_NAME]
    with subprocess_server(args, ready_url=f"http://{HOST}:{port}/health", timeout_s=120):
        return {level.name: run_client(f"http://{HOST}:{port}", level) for level in plan}


def orch_phase(slots: int, threads: int, plan: list[Level]) -> dict[str, dict[str, Any]]:
    pool = smollm2_pool(slots=slots, threads=threads, ctx=CTX, capacity=256, engine_options={"batching": True})
    with orchestrator([pool], name="bench-vs-llama-server", num_cpus=3, access_log=False) as orch:
        return {level.name: run_client(orch.base_url, level) for level in plan}


def compare(plan: list[Level], peer: dict[str, dict[str, Any]],
            ours: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for level in plan:
        theirs, mine = peer.get(level.name, {}), ours[level.name]
        rows.append({
            "level": level.name, "concurrency": level.concurrency, "input_len": level.input_len,
            "output_len": level.output_len, "prompts": level.prompts,
            "tok_s": {LLAMA_SERVER: theirs.get("tok_s"), ORCH: mine["tok_s"]},
            "tok_s_ratio": ratio(mine["tok_s"], theirs.get("tok_s", float("nan"))),
            "tpot_p50_ms": {LLAMA_SERVER: theirs.get("tpot_p50_ms"), ORCH: mine["tpot_p50_ms"]},
            "tpot_p50_ratio": ratio(mine["tpot_p50_ms"], theirs.get("tpot_p50_ms", float("nan"))),
            "ttft_p50_ms": {LLAMA_SERVER: theirs.get("ttft_p50_ms"), ORCH: mine["ttft_p50_ms"]},
            "failed": {LLAMA_SERVER: theirs.get("failed"), ORCH: mine["failed"]},
        })
    return rows


def main() -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--slots", type=int, default=8, help="llama-server -np and the pool's slots")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads on both sides")
    p.add_argument("--build", action="store_true", help="build llama-server when none is found")
    args = p.parse_args()
    banner("vs llama-server", args.quick)
    why = missing()
    binary = None if why else find_llama_server(args.build)
    if why is None and binary is None:
        why = f"no llama-server found; run {BUILD_SCRIPT.relative_to(ROOT)} or pass --build"
    if why:
        print(f"## Orchestrator vs llama-server\n\nskipped: {why}\n")
        return 0
    plan = levels(args.quick)
    slots = min(args.slots, 4) if args.quick else args.slots
    peer = llama_server_phase(binary, slots, args.threads, plan)
    ours = orch_phase(slots, args.threads, plan)
    rows = compare(plan, peer, ours)
    table = [[row["level"], fmt(row["tok_s"][LLAMA_SERVER], 1), fmt(row["tok_s"][ORCH], 1),
              fmt_ratio(row["tok_s_ratio"]), fmt(row["tpot_p50_ms"][LLAMA_SERVER]), fmt(row["tpot_p50_ms"][ORCH]),
              fmt_ratio(row["tpot_p50_ratio"]), fmt(row["ttft_p50_ms"][LLAMA_SERVER], 0),
              fmt(row["ttft_p50_ms"][ORCH], 0), f"{row['failed'][LLAMA_SERVER]} / {row['failed'][ORCH]}"]
             for row in rows]
    print_table("Orchestrator vs llama-server", [
        "level", "llama-server tok/s", "orch tok/s", "tok/s ratio", "llama-server TPOT p50 ms", "orch TPOT p50 ms",
        "TPOT ratio", "llama-server TTFT p50 ms", "orch TTFT p50 ms", "failed (server / orch)"], table, notes=[
        f"SmolLM2-135M-Instruct Q4_1 GGUF; llama-server -np {slots} -t {args.threads} -c {slots * CTX}; the "
        f"orchestrator's pool: {slots} slots, batching, {args.threads} threads, ctx {CTX}; vLLM's benchmark client, "
        f"random prompts, temperature {TEMPERATURE}, ignore_eos; ratios are orchestrator / llama-server "
        "(tok/s: higher is better; TPOT: lower is better).",
    ])
    write_json(args.json, {"slots": slots, "threads": args.threads, "levels": rows})
    return 1 if any(row["failed"][ORCH] for row in rows) else 0  # the target: no failed request


if __name__ == "__main__":
    sys.exit(main())
