"""CI smoke run of the benchmark harness: every bench/ script with ``--quick`` as a
subprocess; each must exit 0 and print its table of ratios. Numbers are not checked here
(the machine is small and shared); docs/benchmarks.md has the measured ones."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

#: script, subprocess timeout (s), a heading its output must contain
SCRIPTS = [
    ("scale.py", 120, "Memory per queued task"),
    ("placement_quality.py", 120, "Placement quality"),
    ("prefix_routing.py", 240, "Prefix-aware placement"),
    ("fair_queueing.py", 240, "Fair queueing between tenants"),
    ("cold_start.py", 180, "Cold start vs loaded"),
    ("serve_proxy.py", 240, "Serve proxy vs plain uvicorn"),
    ("admission.py", 240, "Admission rate"),
    ("relay.py", 240, "Relay ceiling"),
    ("overhead.py", 420, "Overhead against the bare engine"),
    ("vs_serve_llm.py", 420, "Orchestrator vs Ray Serve LLM"),
    ("vs_llama_server.py", 300, "Orchestrator vs llama-server"),
]

_ROW = re.compile(r"^\| .+ \|$", re.MULTILINE)
_RATIO = re.compile(r"\d\.\d{3}x")


def _run(script: str, timeout_s: int) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, str(BENCH / script), "--quick"], cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:  # the script's own finally blocks stop Ray and its servers
        pytest.fail(f"{script} --quick ran past {timeout_s}s:\n{(exc.stdout or b'')[-3000:]!r}")


@pytest.mark.integration
@pytest.mark.parametrize("script,timeout_s,heading", [
    pytest.param(script, timeout_s, heading, id=script, marks=pytest.mark.timeout(timeout_s + 60))
    for script, timeout_s, heading in SCRIPTS
])
def test_bench_script_quick(script: str, timeout_s: int, heading: str) -> None:
    done = _run(script, timeout_s)
    tail = f"\n--- stdout ---\n{done.stdout[-4000:]}\n--- stderr ---\n{done.stderr[-4000:]}"
    assert done.returncode == 0, f"{script} --quick exited {done.returncode}{tail}"
    if script.startswith("vs_") and "\nskipped: " in done.stdout:  # no vLLM set up here, like test_vllm_pool
        pytest.skip(done.stdout.split("skipped: ", 1)[1].strip())
    assert f"## {heading}" in done.stdout, f"{script} printed no '{heading}' table{tail}"
    assert len(_ROW.findall(done.stdout)) >= 3, f"{script} printed no table rows{tail}"
    if script == "vs_llama_server.py" and "llama-server: not built here" in done.stdout:
        # No build on this machine (scripts/build_llama_server.sh takes minutes): the
        # orchestrator's side alone, through vLLM's own benchmark client, with no failed request.
        rows = [row for row in _ROW.findall(done.stdout) if row.startswith("| c=")]
        assert rows and all(row.rstrip(" |").endswith("- / 0") for row in rows), f"failed requests{tail}"
        return
    assert _RATIO.search(done.stdout), f"{script} printed no ratio{tail}"
    if script == "overhead.py":
        peer_extras = all(importlib.util.find_spec(m) is not None
                          for m in ("sse_starlette", "pydantic_settings", "starlette_context"))
        if peer_extras:
            assert re.search(r"^\| llama_cpp\.server ", done.stdout, re.MULTILINE), f"no llama_cpp.server row{tail}"
        else:  # the peer is skipped cleanly, with a note saying why
            assert "llama_cpp.server: skipped" in done.stdout, tail
