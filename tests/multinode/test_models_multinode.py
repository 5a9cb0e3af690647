"""Models on demand across nodes (simulated cluster): loads land on the node with room and
the least recently used idle model is evicted, whichever node holds it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_models_load_where_there_is_room_and_lru_spans_nodes():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "multinode" / "models_scenario.py")],
                            capture_output=True, text=True, timeout=280, cwd=ROOT, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result; stderr tail:\n{result.stderr[-3000:]}"
    observed = json.loads(lines[-1])
    assert result.returncode == 0 and observed.get("ok"), (observed, result.stderr[-3000:])
    assert observed["after_x_y"] == {"x": "big", "y": "small", "z": None}
    assert observed["after_z"] == {"x": "big", "y": None, "z": "small"}
