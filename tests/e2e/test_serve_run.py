"""The README's main command: ``serve run deployments/home.yaml`` serves real tokens.

Runs the real CLI in a subprocess (its own Ray instance) on a free loopback port.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from orch.config import project_root
from tests.conftest import free_port, read_sse

pytestmark = pytest.mark.integration


def _eight_streams_decode_together(client: httpx.Client) -> None:
    """The embedded default serves 8 concurrent streams at once: every task has started
    before the first one ends (one slot at a time would end the first before the eighth starts)."""
    task_ids = []
    for index in range(8):
        admitted = client.post("/v2/tasks", json={"prompt": f"Story {index}:", "max_tokens": 24, "seed": index,
                                                  "ignore_eos": True})
        assert admitted.status_code == 202, admitted.text
        task_ids.append(admitted.json()["task_id"])
    marks: dict[str, dict[str, float]] = {}

    def follow(task_id: str) -> None:
        def mark(kind: str, data: dict) -> None:
            marks.setdefault(task_id, {})[kind] = time.monotonic()

        with client.stream("GET", f"/v2/tasks/{task_id}/events") as stream:
            events = read_sse(stream, mark)
        assert events[-1][1] == "end" and events[-1][2]["tokens_out"] == 24, events[-1]

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(follow, task_ids))
    assert all("end" in marks[t] for t in task_ids), marks
    assert max(marks[t]["started"] for t in task_ids) < min(marks[t]["end"] for t in task_ids), marks


def test_serve_run_home_profile_streams_tokens(tmp_path: Path):
    root = project_root()
    serve_config = yaml.safe_load((root / "deployments" / "home.yaml").read_text())
    port = free_port()
    serve_config["http_options"]["port"] = port
    config_file = tmp_path / "home.yaml"
    config_file.write_text(yaml.safe_dump(serve_config))

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    serve_bin = Path(sys.executable).parent / "serve"
    log_file = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [str(serve_bin), "run", str(config_file)],
        cwd=root,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 120
            ready = None
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    ready = client.get("/readyz")
                    if ready.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            assert ready is not None and ready.status_code == 200, (tmp_path / "serve.log").read_text()[-3000:]
            admitted = client.post("/v2/tasks", json={"prompt": "Once upon a time", "max_tokens": 8, "seed": 2})
            assert admitted.status_code == 202
            with client.stream("GET", f"/v2/tasks/{admitted.json()['task_id']}/events") as stream:
                events = read_sse(stream)
            assert events[0][1] == "started"
            assert events[-1][1] == "end" and events[-1][2]["tokens_out"] == 8
            _eight_streams_decode_together(client)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log_file.close()
