"""Auth and secrets beyond tests/unit/test_auth.py and tests/integration/test_auth_http.py.

- With the loopback bypass on, a client that is not on loopback still needs the token, on
  every route of the real app (built in process, the client address given to the ASGI
  transport).
- Tokens are compared in constant time, over fixed-length sha256 digests.
- A run with a bearer token and an external engine behind an API key: neither secret
  appears in any HTTP answer, SSE stream, transcript, artifact, file under the roots or Ray
  log, including when the upstream server puts the key into its own error messages.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import ray

import orch.serve.auth as auth
from orch.config import parse_config
from orch.serve.app import build_app
from orch.serve.registry import PoolRegistry
from orch.serve.state import IngressState
from tests.conftest import HOST, home_config
from tests.reliability.support import TaskLedger, follow, rooted, wait_for

TOKEN = "reliability-bearer-token-5b1e07c2"
UPSTREAM_KEY = "upstream-api-key-0f9d3c7e1a"
WRONG_TOKEN = "presented-wrong-token-77aa31"


# --------------------------------------------------------------------------- in process


def real_app(token: str, bypass: bool):
    config = home_config()
    config["server"] = {"auth_token": token, "loopback_bypass": bypass}
    parsed = parse_config(config)
    return build_app(IngressState(parsed, PoolRegistry(parsed, {}, parsed.server.snapshot_ttl_s)))


def call(app, method: str, path: str, client_host: str, headers=None) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app, client=(client_host, 40123))
        async with httpx.AsyncClient(transport=transport, base_url="http://orch") as client:
            return await client.request(method, path, headers=headers or {}, json={})

    return asyncio.run(go())


def documented_routes(app) -> list[tuple[str, str]]:
    return [(route.method, re.sub(r"{[^}]+}", "x1", route.path)) for route in app.state.api_routes
            if route.path not in auth.OPEN_PATHS]


def test_with_the_loopback_bypass_a_remote_client_still_needs_the_token_on_every_route():
    app = real_app(TOKEN, bypass=True)
    routes = documented_routes(app)
    assert len(routes) >= 30
    for method, path in routes:
        for headers in ({}, {"Authorization": f"Bearer {WRONG_TOKEN}"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}, {"X-Forwarded-For": "127.0.0.1"}):
            for host in ("10.0.0.7", "192.168.1.20", "2001:db8::1", "localhost.evil.example"):
                response = call(app, method, path, host, headers)
                assert response.status_code == 401, (method, path, host, headers, response.text)
                assert TOKEN not in response.text and WRONG_TOKEN not in response.text
    # The same app lets loopback in without a token, and a remote client with it.
    assert call(app, "GET", "/v2/meta/version", "127.0.0.1").status_code == 200
    assert call(app, "GET", "/v2/meta/version", "::1").status_code == 200
    assert call(app, "GET", "/v2/meta/version", "10.0.0.7", {"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_tokens_are_compared_in_constant_time_over_fixed_length_digests(monkeypatch):
    source = inspect.getsource(auth.AuthMiddleware)
    assert "hmac.compare_digest" in source and "hashlib.sha256" in source
    assert "==" not in re.sub(r"#.*", "", source.split("async def __call__")[1].split("reason =")[0])
    compared: list[tuple[bytes, bytes]] = []
    compare = hmac.compare_digest

    def recording_compare(a, b):
        compared.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", recording_compare)
    app = real_app(TOKEN, bypass=False)
    for presented in ("x", TOKEN[:-1], TOKEN + "x" * 500, TOKEN):
        call(app, "GET", "/v2/meta/version", "10.0.0.7", {"Authorization": f"Bearer {presented}"})
    assert len(compared) == 4
    assert all(isinstance(a, bytes) and len(a) == len(b) == 32 for a, b in compared)
    assert compared[-1][1] == hashlib.sha256(TOKEN.encode()).digest()


# --------------------------------------------------------------------------- a real run


class Upstream:
    """An OpenAI-compatible completion server on 127.0.0.1 behind an API key. Prompts with
    ``echo-key`` make it answer an error that quotes the key it was sent, as careless
    servers and proxies do."""

    def __init__(self) -> None:
        self.server = ThreadingHTTPServer((HOST, 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.server.server_address[1]}/v1"

    def _handler(self):
        class Handler(BaseHTTPRequestHandler):
            server_version = "fakeup/1"

            def log_message(self, *args) -> None:
                pass

            def _json(self, status: int, body: dict) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _authorised(self) -> bool:
                if self.headers.get("authorization") == f"Bearer {UPSTREAM_KEY}":
                    return True
                self._json(401, {"error": {"message": "bad key"}})
                return False

            def do_GET(self) -> None:
                if self._authorised():
                    self._json(200, {"object": "list", "data": [{"id": "up-model", "object": "model"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                if not self._authorised():
                    return
                sent = self.headers.get("authorization")
                if "echo-key-refusal" in body.get("prompt", ""):
                    self._json(400, {"error": {"message": f"prompt refused; request carried '{sent}'"}})
                    return
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.end_headers()
                for n in range(int(body.get("max_tokens", 4))):
                    self.wfile.write(f"data: {json.dumps({'choices': [{'text': f' w{n}'}]})}\n\n".encode())
                if "echo-key-midstream" in body.get("prompt", ""):
                    self.wfile.write(f"data: {json.dumps({'error': {'message': f'failed for {sent}'}})}\n\n".encode())
                    return
                self.wfile.write(b"data: [DONE]\n\n")

        return Handler

    def __enter__(self) -> "Upstream":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with Upstream() as server:
        yield server


@pytest.fixture(scope="module")
def service(deploy, upstream, tmp_path_factory):
    root = tmp_path_factory.mktemp("secrets")
    key_file = root / "upstream.key"
    key_file.write_text(UPSTREAM_KEY)
    config = rooted({
        "version": 1,
        "server": {"auth_token": TOKEN, "loopback_bypass": False},
        "supervision": {"backoff_base_s": 0.2, "backoff_max_s": 1.0},
        "pools": [{"id": "ext", "engine": "external", "model": "up-model", "num_gpus": 0, "num_cpus": 0.1,
                   "allow_cpu": True, "slots": 2, "ctx": 4096,
                   "engine_options": {"base_url": upstream.base_url, "api_key_file": str(key_file)}}],
    }, root / "roots")
    client = deploy(config, name="orch-rel-secrets", route_prefix="/rsecrets")
    client.headers["Authorization"] = f"Bearer {TOKEN}"
    return client, root


def run_task(client: httpx.Client, prompt: str, texts: list[str]) -> list[tuple[int, str, dict]]:
    ledger = TaskLedger()
    response = client.post("/v2/tasks", json={"prompt": prompt, "max_tokens": 3})
    texts.append(response.text)
    task_id = ledger.accept(response)
    assert task_id, response.text
    follow(client, ledger, task_id)
    ledger.assert_all_accounted()
    events = ledger.events[task_id]
    texts.append(json.dumps(events))
    transcript = client.get(f"/v2/artifacts/{events[-1][2]['transcript_id']}")
    assert transcript.status_code == 200
    texts.append(transcript.text)
    return events


def leaks(text: str) -> list[str]:
    return [name for name, secret in (("bearer token", TOKEN), ("upstream key", UPSTREAM_KEY),
                                       ("presented token", WRONG_TOKEN)) if secret in text]


def scan_files(folders: list[Path]) -> dict[str, list[str]]:
    found = {}
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                hits = leaks(path.read_text(errors="replace"))
                if hits:
                    found[str(path)] = hits
    return found


def ray_logs() -> Path:
    return Path(ray._private.worker._global_node.get_logs_dir_path())


@pytest.mark.integration
def test_no_secret_reaches_answers_transcripts_artifacts_or_logs(service):
    client, root = service
    texts: list[str] = []
    events = run_task(client, "Once upon a time", texts)
    assert events[-1][1] == "end" and events[-1][2]["tokens_out"] == 3
    for path in ("/v2/pools/ext/health", "/v2/meta/capabilities", "/metrics", "/readyz", "/v1/models",
                 "/v2/catalog/handoffs", "/openapi.json"):
        texts.append(client.get(path).text)
    chat = client.post("/v1/chat/completions", json={"model": "up-model", "messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 2, "stream": True})
    texts.append(chat.text)
    refused = client.get("/v2/meta/version", headers={"Authorization": f"Bearer {WRONG_TOKEN}"})
    assert refused.status_code == 401
    texts.append(refused.text)
    assert not [leaks(text) for text in texts if leaks(text)]
    assert not scan_files([root / "roots"])

    def logs_clean():
        return scan_files([ray_logs()]) or True

    found = wait_for(logs_clean, 5)  # the last lines of the run are flushed by now
    assert found is True, found


@pytest.mark.integration
@pytest.mark.parametrize("prompt", ["echo-key-refusal", "echo-key-midstream"])
def test_an_upstream_that_quotes_the_key_does_not_make_it_leak(service, prompt):
    """Upstream error text reaches the task's error event, its transcript and the pool's log:
    the key must be redacted from it first."""
    client, root = service
    texts: list[str] = []
    events = run_task(client, prompt, texts)
    assert events[-1][1] == "error" and events[-1][2]["code"], events[-1]
    texts.append(client.get("/v2/pools/ext/health").text)
    assert not [leaks(text) for text in texts if leaks(text)], [t[:400] for t in texts if leaks(t)]
    assert not scan_files([root / "roots"])
    assert not scan_files([ray_logs()])
