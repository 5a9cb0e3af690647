"""Multi-node behaviour on a simulated cluster (head without GPUs, fake-GPU workers):
pools land on the nodes that hold their GPUs, the ingress places across nodes, and a pool
whose node dies is restarted on another node with capacity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_pools_follow_their_gpus_across_nodes():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "multinode" / "scenario.py")],
                            capture_output=True, text=True, timeout=280, cwd=ROOT, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result; stderr tail:\n{result.stderr[-3000:]}"
    observed = json.loads(lines[-1])
    assert result.returncode == 0 and observed.get("ok"), (observed, result.stderr[-3000:])
    assert observed["used"] == ["pool-a", "pool-b"] and observed["first"] == "pool-b"
    assert observed["vram_total"] == {"pool-a": 24, "pool-b": 80}
    assert observed["tp_group"]["strategy"] == "PACK" and len(observed["tp_group"]["bundles"]) == 2
    assert len(set(observed["placed"].values())) == 2  # one pool per GPU node
    assert observed["restarted_on"] not in observed["placed"].values()  # a new node, the old one is gone
