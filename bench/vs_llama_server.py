"""The orchestrator's llama.cpp pool against llama.cpp's own ``llama-server``.

Same GGUF (SmolLM2-135M-Instruct Q4_1), same llama.cpp version (llama-server is built from the
source vendored in the installed llama-cpp-python's sdist by scripts/build_llama_server.sh),
one server at a time on this machine, and the same client: vLLM's benchmark client
(``vllm.benchmarks.serve``), unmodified, run as a library, on ``/v1/completions`` with random
prompts (bench/vs_server.py). llama-server runs with ``-np SLOTS -t THREADS``; the orchestrator
with one pool of SLOTS slots, continuous batching (the default) and THREADS threads
(``--orch-threads`` to measure another count). The table gives both servers' aggregate output
tok/s, TTFT p50 and TPOT p50 per level, their ratios (orchestrator / llama-server) and failed
requests; ``--json`` writes them per level. ``--quick`` (the CI smoke) runs the orchestrator's
side alone when no llama-server has been built.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (HOST, banner, free_port, log, orchestrator, parser, smollm2_path, smollm2_pool,  # noqa: E402
                    subprocess_server)
from vs_server import (MODEL_NAME, Level, add_sampling_args, client_missing, compare, report,  # noqa: E402
                       run_client, sampling_note, sampling_of)

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = ROOT / "scripts" / "build_llama_server.sh"
LLAMA_SERVER = "llama-server"
CTX = 2048


def levels(quick: bool) -> list[Level]:
    if quick:
        return [Level(1, 16, 8, 2), Level(4, 16, 8, 8)]
    return [Level(1, 64, 64, 16), Level(8, 64, 64, 32), Level(32, 64, 64, 64), Level(8, 512, 64, 32)]


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


def llama_server_phase(binary: str, slots: int, threads: int, plan: list[Level],
                       sampling: dict[str, Any]) -> dict[str, dict[str, Any]]:
    port = free_port()
    args = [binary, "-m", smollm2_path(), "--host", HOST, "--port", str(port), "-np", str(slots),
            "-t", str(threads), "-c", str(slots * CTX), "-a", MODEL_NAME]
    with subprocess_server(args, ready_url=f"http://{HOST}:{port}/health", timeout_s=120):
        return {level.name: run_client(f"http://{HOST}:{port}", level, sampling) for level in plan}


def orch_phase(slots: int, threads: int, plan: list[Level], stream_interval_ms: Optional[int],
               sampling: dict[str, Any], prefill_chunk: Optional[int] = None) -> dict[str, dict[str, Any]]:
    options = {} if prefill_chunk is None else {"engine_options": {"prefill_chunk": prefill_chunk}}
    pool = smollm2_pool(slots=slots, threads=threads, ctx=CTX, capacity=256, **options)  # batching: the default
    server = {} if stream_interval_ms is None else {"stream_interval_ms": stream_interval_ms}
    with orchestrator([pool], name="bench-vs-llama-server", num_cpus=3, access_log=False, **server) as orch:
        return {level.name: run_client(orch.base_url, level, sampling) for level in plan}


def main() -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--slots", type=int, default=8, help="llama-server -np and the pool's slots")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads on both sides")
    p.add_argument("--orch-threads", type=int, default=None,
                   help="the pool's llama.cpp threads when they differ from llama-server's --threads")
    p.add_argument("--build", action="store_true", help="build llama-server when none is found")
    p.add_argument("--no-peer", action="store_true", help="the orchestrator alone (e.g. another --orch-threads)")
    p.add_argument("--stream-interval-ms", type=int, default=None,
                   help="the server's stream_interval_ms (default: the config's default)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="the pool's prefill_chunk: prompt tokens read per step (default: the engine's)")
    add_sampling_args(p)
    args = p.parse_args()
    banner("vs llama-server", args.quick)
    why = client_missing()
    if why:
        print(f"## Orchestrator vs llama-server\n\nskipped: {why}\n")
        return 0
    binary = None if args.no_peer else find_llama_server(args.build)
    if binary is None and not (args.quick or args.no_peer):
        print(f"## Orchestrator vs llama-server\n\nskipped: no llama-server found; run "
              f"{BUILD_SCRIPT.relative_to(ROOT)} or pass --build\n")
        return 0
    plan = levels(args.quick)
    slots = min(args.slots, 4) if args.quick else args.slots
    orch_threads = args.orch_threads or args.threads
    sampling = sampling_of(args)
    peer = llama_server_phase(binary, slots, args.threads, plan, sampling) if binary else {}
    ours = orch_phase(slots, orch_threads, plan, args.stream_interval_ms, sampling, args.prefill_chunk)
    notes = [f"SmolLM2-135M-Instruct Q4_1 GGUF; llama-server -np {slots} -t {args.threads} -c {slots * CTX}; the "
             f"orchestrator's pool: {slots} slots, batching, {orch_threads} threads, ctx {CTX}"
             + ("" if args.prefill_chunk is None else f", prefill_chunk {args.prefill_chunk}")
             + ("." if args.stream_interval_ms is None else f"; stream_interval_ms {args.stream_interval_ms}."),
             sampling_note(sampling)]
    if args.no_peer:
        notes.append("llama-server: not run (--no-peer).")
    elif binary is None:  # the quick smoke run on a machine without a build: the orchestrator's side alone
        notes.append(f"llama-server: not built here ({BUILD_SCRIPT.relative_to(ROOT)} builds it), so no ratios.")
    return report("Orchestrator vs llama-server", LLAMA_SERVER, compare(plan, LLAMA_SERVER, peer, ours), notes,
                  args.json, {"slots": slots, "threads": args.threads, "orch_threads": orch_threads,
                              "prefill_chunk": args.prefill_chunk,
                              "sampling": sampling or "server defaults"})


if __name__ == "__main__":
    sys.exit(main())
