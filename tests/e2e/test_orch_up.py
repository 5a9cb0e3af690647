"""``orch up`` starts Ray, Serve and the orchestrator from a config, serves real tokens, and on
SIGTERM removes everything it started.

Runs the real console script in a subprocess (its own Ray instance) on a free loopback port,
in its own session so that every process it started can be found afterwards.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, read_sse

pytestmark = pytest.mark.integration

READY_TIMEOUT_S = 180
STOP_TIMEOUT_S = 90
#: Ray's agents notice their raylet is gone on their next liveness check.
LEFTOVER_TIMEOUT_S = 30


def orch_command() -> list[str]:
    script = Path(sys.executable).parent / "orch"
    return [str(script)] if script.exists() else [sys.executable, "-m", "orch.cli"]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "ORCH_URL", "ORCH_TOKEN")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def session_processes(session_id: int) -> list[tuple[int, str]]:
    """Live processes of a session: (pid, name)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == session_id and fields[0] != "Z":
            found.append((int(entry.name), stat[stat.index("(") + 1:stat.rindex(")")]))
    return found


def kill_session(session_id: int) -> None:
    for pid, _ in session_processes(session_id):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finding a session's processes needs /proc")
def test_orch_up_serves_then_stops_everything_it_started(tmp_path: Path):
    port = free_port()
    log_path = tmp_path / "orch-up.log"
    with log_path.open("w") as log:
        # From a scratch directory: the service's relative runtime paths (artifacts) land there.
        proc = subprocess.Popen(orch_command() + ["up", "--port", str(port)], cwd=tmp_path, env=clean_env(),
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=30) as client:
            deadline = time.monotonic() + READY_TIMEOUT_S
            ready = None
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    ready = client.get("/readyz")
                    if ready.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            assert ready is not None and ready.status_code == 200, log_path.read_text()[-3000:]
            admitted = client.post("/v2/tasks", json={"prompt": "Once upon a time", "max_tokens": 8, "seed": 2})
            assert admitted.status_code == 202, admitted.text
            with client.stream("GET", f"/v2/tasks/{admitted.json()['task_id']}/events") as stream:
                events = read_sse(stream)
            assert events[0][1] == "started"
            assert events[-1][1] == "end" and events[-1][2]["tokens_out"] == 8
            assert client.get("/ui").status_code == 200
        serving = f"orch: serving {url} (status page {url}/ui"
        deadline = time.monotonic() + 60  # Serve may answer before serve.run has returned in orch up
        while serving not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=STOP_TIMEOUT_S) == 0, log_path.read_text()[-3000:]
        output = log_path.read_text()
        assert serving in output
        assert "orch: stopping" in output
        deadline = time.monotonic() + LEFTOVER_TIMEOUT_S
        while session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert session_processes(proc.pid) == [], "orch up left processes behind"
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))  # the port is free again
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        kill_session(proc.pid)


def test_orch_up_refuses_a_missing_config_without_starting_anything(tmp_path: Path):
    result = subprocess.run(orch_command() + ["up", "--config", "no/such/config.yaml"], cwd=tmp_path, env=clean_env(),
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert result.stderr.startswith("orch: config file no/such/config.yaml not found in ")
    assert "Ray" not in result.stderr


def test_orch_up_refuses_a_port_in_use(tmp_path: Path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(orch_command() + ["up", "--port", str(port)], cwd=tmp_path, env=clean_env(),
                                capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert result.stderr.startswith(f"orch: cannot listen on 127.0.0.1:{port} (")
    assert result.stderr.strip().endswith("choose another port with --port")
