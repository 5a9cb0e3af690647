"""The logs of a real run: narration with context on every key moment, and no secrets."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
import ray

from tests.conftest import home_config, read_sse

pytestmark = pytest.mark.integration

TOKEN = "log-scan-token-zyxwvutsrq"


@pytest.fixture(scope="module")
def client(deploy) -> httpx.Client:
    config = home_config()
    config["server"] = {"auth_token": TOKEN, "loopback_bypass": False}
    return deploy(config, name="orch-logs", route_prefix="/logs")


def log_lines() -> list[tuple[Path, str]]:
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    lines = []
    for path in logs.rglob("*"):
        if path.is_file() and path.suffix in (".log", ".err", ".out", ".txt", ""):
            try:
                lines.extend((path, line) for line in path.read_text(errors="replace").splitlines())
            except OSError:
                continue
    return lines


def test_key_moments_are_narrated_with_context_and_no_secret_is_logged(client):
    headers = {"Authorization": f"Bearer {TOKEN}", "X-Correlation-Id": "corr-log-check-1"}
    admitted = client.post("/v2/tasks", json={"prompt": "Once upon a time", "max_tokens": 5, "session_id": "sess-log"},
                           headers=headers)
    assert admitted.status_code == 202
    task_id = admitted.json()["task_id"]
    with client.stream("GET", f"/v2/tasks/{task_id}/events", headers=headers) as stream:
        read_sse(stream)
    client.get("/v2/meta/version", headers={"Authorization": "Bearer wrong-guess-123456"})

    found: list[dict] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        lines = log_lines()
        found = []
        for _, line in lines:
            start = line.find("{")
            if start < 0 or "corr-log-check-1" not in line:
                continue
            try:
                found.append(json.loads(line[start:]))
            except ValueError:
                continue
        humans = [entry for entry in found if entry.get("human")]
        if len({entry.get("logger") for entry in humans}) >= 2 and any("Finished" in e["human"] for e in humans):
            break
        time.sleep(0.5)
    humans = [entry for entry in found if entry.get("human")]
    sentences = " | ".join(entry["human"] for entry in humans)
    assert "Placed on pool default" in sentences
    assert "Accepted by pool default" in sentences
    assert "Started on pool default" in sentences
    assert "Finished on pool default" in sentences
    for entry in humans:
        assert entry["correlation_id"] == "corr-log-check-1"
        assert entry.get("task_id") == task_id and entry.get("pool_id") == "default"
        assert task_id not in entry["human"] and "corr-log-check-1" not in entry["human"]
    assert any(entry.get("session_id") == "sess-log" for entry in humans)

    for path, line in log_lines():
        assert TOKEN not in line, f"token leaked into {path}"
        assert "wrong-guess-123456" not in line, f"a presented token leaked into {path}"
