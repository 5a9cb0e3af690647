"""The orchestrator's vLLM pool against vLLM's own OpenAI server.

The same converted SmolLM2 checkpoint (scripts/setup_vllm.sh), the same vLLM build and engine
settings, one server at a time on this machine, and the same client: vLLM's benchmark client
run as a library on ``/v1/completions`` with random prompts (bench/vs_server.py), at c=1 and
c=8. vLLM's server runs as ``python -m vllm.entrypoints.openai.api_server`` with the CPU
threads it picks itself; the pool is given the same number (``threads``, which sets the
pool process's ``OMP_NUM_THREADS``; Ray would otherwise set it from ``num_cpus``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import HOST, banner, free_port, orchestrator, parser, subprocess_server  # noqa: E402
from vs_server import (MODEL_NAME, TOKENIZER_DIR, Level, add_sampling_args, client_missing, compare,  # noqa: E402
                       report, run_client, sampling_note, sampling_of)

VLLM_SERVER = "vLLM server"
CTX = 1024
KV_BYTES = 256 * 1024 * 1024
ENGINE = {"max_model_len": CTX, "enforce_eager": True, "kv_cache_memory_bytes": KV_BYTES}


def levels(quick: bool) -> list[Level]:
    if quick:
        return [Level(1, 16, 8, 2), Level(4, 16, 8, 8)]
    return [Level(1, 64, 64, 16), Level(8, 64, 64, 32)]


def missing() -> str | None:
    why = client_missing()
    if why is None and not (TOKENIZER_DIR / "config.json").is_file():
        why = f"the converted checkpoint {TOKENIZER_DIR} is missing (scripts/setup_vllm.sh makes it)"
    return why


def vllm_server_phase(slots: int, plan: list[Level], sampling: dict[str, Any]) -> dict[str, dict[str, Any]]:
    port = free_port()
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(TOKENIZER_DIR),
            "--served-model-name", MODEL_NAME, "--host", HOST, "--port", str(port), "--max-model-len", str(CTX),
            "--max-num-seqs", str(slots), "--enforce-eager", "--kv-cache-memory-bytes", str(KV_BYTES)]
    with subprocess_server(args, ready_url=f"http://{HOST}:{port}/health", timeout_s=300, env=dict(os.environ)):
        return {level.name: run_client(f"http://{HOST}:{port}", level, sampling) for level in plan}


def orch_phase(slots: int, threads: int, plan: list[Level], sampling: dict[str, Any]) -> dict[str, dict[str, Any]]:
    pool = {"id": "vllm", "engine": "vllm", "model": f"file:{TOKENIZER_DIR}", "model_aliases": [MODEL_NAME],
            "num_gpus": 0, "allow_cpu": True, "num_cpus": 1, "threads": threads, "slots": slots, "ctx": CTX,
            "queue": {"capacity": 256, "policy": "reject"}, "engine_options": ENGINE}
    with orchestrator([pool], name="bench-vs-vllm-server", num_cpus=3, ready_timeout_s=300, access_log=False) as orch:
        return {level.name: run_client(orch.base_url, level, sampling) for level in plan}


def main() -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--slots", type=int, default=8, help="vLLM's --max-num-seqs and the pool's slots")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="the pool's CPU threads (vLLM's server uses every core it sees)")
    add_sampling_args(p)
    args = p.parse_args()
    banner("vs vLLM server", args.quick)
    why = missing()
    if why:
        print(f"## Orchestrator vs vLLM's OpenAI server\n\nskipped: {why}\n")
        return 0
    plan = levels(args.quick)
    slots = min(args.slots, 4) if args.quick else args.slots
    sampling = sampling_of(args)
    peer = vllm_server_phase(slots, plan, sampling)
    ours = orch_phase(slots, args.threads, plan, sampling)
    notes = [f"SmolLM2-135M-Instruct (the converted checkpoint), vLLM's CPU build, max_model_len {CTX}, enforce_eager, "
             f"{KV_BYTES // 2**20} MiB KV cache, {slots} sequences at most; the pool: {slots} slots, {args.threads} "
             "threads.", sampling_note(sampling)]
    return report("Orchestrator vs vLLM's OpenAI server", VLLM_SERVER, compare(plan, VLLM_SERVER, peer, ours), notes,
                  args.json, {"slots": slots, "threads": args.threads, "sampling": sampling or "server defaults"})


if __name__ == "__main__":
    sys.exit(main())
