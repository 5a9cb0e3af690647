"""Outbound fetches never reach internal addresses unless the policy names them.

Judged at the policy level with a fake resolver (no DNS), and through the real fetchers
(urllib for https/http, huggingface-hub's client for hf) against loopback servers only: each
connection goes to the address that was judged, never to a second lookup of the name.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from orch.core import net
from orch.provision.errors import OutboundRefused
from orch.provision.fetch_url import download
from orch.provision.models import ProvisionSettings, execute, plan
from orch.provision.policy import check_url, checked_addresses
from tests.loopback_servers import FileServer, HubRepo, HubStandIn
from tests.gguf_writer import tiny_gguf

PUBLIC = "93.184.216.34"
HOSTS = "catalog.outbound.allowed_hosts"


def policy(**kwargs) -> ProvisionSettings:
    return ProvisionSettings(model_cache="/tmp/unused-cache", **kwargs)


def fake(table: dict[str, list[str]], calls: list | None = None):
    def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append((host, port))
        if host not in table:
            raise socket.gaierror(f"fake resolver knows no {host}")
        return table[host]

    return resolve


@pytest.fixture()
def no_dns(monkeypatch):
    """Any lookup of a name (not an address) fails the test: connections must use the judged address."""
    real = socket.getaddrinfo

    def guarded(host, *args, **kwargs):
        if net.ip_of(str(host)) is None:
            raise AssertionError(f"a second lookup of {host!r}: the connection did not use the judged address")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)


@pytest.mark.parametrize("host,kind", [
    ("127.0.0.1", "loopback"), ("[::1]", "loopback"), ("localhost", "loopback"),
    ("169.254.169.254", "link-local"), ("[fe80::1]", "link-local"),
    ("10.1.2.3", "private"), ("172.16.0.9", "private"), ("192.168.1.1", "private"), ("100.64.0.1", "private"),
    ("[fc00::1]", "private"), ("[fd12::1]", "private"), ("[::ffff:10.0.0.1]", "private"),
    ("0.0.0.0", "unspecified"), ("[::]", "unspecified"), ("224.0.0.1", "multicast"), ("[ff02::1]", "multicast"),
    ("255.255.255.255", "broadcast"),
])
def test_internal_addresses_are_refused_by_default_naming_rule_and_setting(host, kind):
    with pytest.raises(OutboundRefused, match=f"a {kind} address.*unless {HOSTS} lists the host or a CIDR"):
        check_url(f"https://{host}/m.gguf", policy())
    with pytest.raises(OutboundRefused, match=kind):  # a redirect there is refused the same way
        check_url(f"https://{host}/m.gguf", policy(), came_from="https://example.com/m.gguf")


def test_the_resolved_addresses_are_judged_every_one():
    assert checked_addresses("mirror.example", 443, policy(), fake({"mirror.example": [PUBLIC]})) == [PUBLIC]
    with pytest.raises(OutboundRefused, match=r"mirror.example resolves to 169.254.169.254, which is a link-local"):
        checked_addresses("mirror.example", 443, policy(), fake({"mirror.example": ["169.254.169.254"]}))
    # One bad address among good ones refuses the host, whichever the resolver lists first.
    with pytest.raises(OutboundRefused, match="10.0.0.7, which is a private address"):
        checked_addresses("mirror.example", 443, policy(), fake({"mirror.example": [PUBLIC, "10.0.0.7"]}))


def test_allowed_hosts_admits_a_private_mirror_by_name_or_cidr():
    resolver = fake({"mirror.internal": ["10.0.0.7"], "other.internal": ["10.9.0.1"], "cdn.example": [PUBLIC]})
    by_name = policy(allowed_hosts=("mirror.internal",))
    check_url("https://mirror.internal/m.gguf", by_name)
    assert checked_addresses("mirror.internal", 443, by_name, resolver) == ["10.0.0.7"]
    by_cidr = policy(allowed_hosts=("10.0.0.0/24",))
    check_url("https://mirror.internal/m.gguf", by_cidr)  # a name passes the URL check; its addresses decide
    check_url("https://10.0.0.9/m.gguf", by_cidr)
    assert checked_addresses("mirror.internal", 443, by_cidr, resolver) == ["10.0.0.7"]
    with pytest.raises(OutboundRefused, match=rf"'other.internal' \(it resolves to 10.9.0.1\), a private address, is not in {HOSTS}"):
        checked_addresses("other.internal", 443, by_cidr, resolver)
    with pytest.raises(OutboundRefused, match=f"is not in {HOSTS}"):
        checked_addresses("cdn.example", 443, by_cidr, resolver)  # a list restricts public hosts too
    with pytest.raises(OutboundRefused, match="169.254.169.254"):
        check_url("https://169.254.169.254/latest/meta-data", by_cidr)


def test_a_download_connects_to_the_judged_address(tmp_path, monkeypatch, no_dns):
    server = FileServer(files={"/m.gguf": b"model bytes"}).start()
    calls: list = []
    monkeypatch.setattr(net, "resolve", fake({"localhost": ["127.0.0.1"]}, calls))
    try:
        settings = ProvisionSettings(model_cache=str(tmp_path), allowed_hosts=("127.0.0.0/8",))
        url = server.url("/m.gguf").replace("127.0.0.1", "localhost")
        path, _, size = download(url, tmp_path / "url" / "m.gguf", settings)
        assert path.read_bytes() == b"model bytes" and size == 11
        assert calls == [("localhost", int(url.split(":")[2].split("/")[0]))]
    finally:
        server.stop()


def test_dns_rebinding_cannot_swap_the_address(tmp_path, monkeypatch, no_dns):
    """The name resolved to loopback when it was first judged; now it resolves to a private
    address: the connection is refused before it is made."""
    server = FileServer(files={"/m.gguf": b"model bytes"}).start()
    answers = iter([["127.0.0.1"], ["10.0.0.9"]])
    monkeypatch.setattr(net, "resolve", lambda host, port: next(answers))
    try:
        settings = ProvisionSettings(model_cache=str(tmp_path), allowed_hosts=("127.0.0.0/8",))
        url = server.url("/m.gguf").replace("127.0.0.1", "localhost")
        download(url, tmp_path / "url" / "a.gguf", settings)
        with pytest.raises(OutboundRefused, match="resolves to 10.0.0.9"):
            download(url, tmp_path / "url" / "b.gguf", settings)
        assert len(server.requests) == 1
    finally:
        server.stop()


def test_a_redirect_to_a_name_that_resolves_inside_is_refused(tmp_path, monkeypatch, no_dns):
    server = FileServer(files={}, redirects={"/start": "https://metadata.test/latest/meta-data"}).start()
    monkeypatch.setattr(net, "resolve", fake({"metadata.test": ["169.254.169.254"]}))
    try:
        settings = ProvisionSettings(model_cache=str(tmp_path), allowed_hosts=("127.0.0.0/8",))
        with pytest.raises(OutboundRefused, match="'metadata.test' .*169.254.169.254"):
            download(server.url("/start"), tmp_path / "url" / "m.gguf", settings)
        assert [r.path for r in server.requests] == ["/start"]
    finally:
        server.stop()


@pytest.fixture()
def hub():
    server = HubStandIn({"org/tiny": HubRepo({"tiny.gguf": tiny_gguf(context_length=256)})}).start()
    yield server
    server.stop()


def test_hf_connections_go_to_the_judged_address(tmp_path, monkeypatch, hub, no_dns):
    calls: list = []
    monkeypatch.setattr(net, "resolve", fake({"localhost": ["127.0.0.1"]}, calls))
    settings = ProvisionSettings(model_cache=str(tmp_path / "cache"), timeout_s=5, allowed_hosts=("127.0.0.0/8",),
                                 hf_endpoint=hub.endpoint.replace("127.0.0.1", "localhost"))
    record = execute(plan("hf:org/tiny/tiny.gguf", settings), settings)
    assert Path(record["local_path"]).is_file()
    port = int(settings.hf_endpoint.rsplit(":", 1)[1])
    assert ("localhost", port) in calls and hub.requests
    # Anything else the client asks for goes through the same gate (here: refused, the fake knows no other name).


def test_hf_rebinding_to_a_private_address_is_refused(tmp_path, monkeypatch, hub, no_dns):
    monkeypatch.setattr(net, "resolve", fake({"localhost": ["10.0.0.9"]}))
    settings = ProvisionSettings(model_cache=str(tmp_path / "cache"), timeout_s=5, allowed_hosts=("127.0.0.0/8",),
                                 hf_endpoint=hub.endpoint.replace("127.0.0.1", "localhost"))
    with pytest.raises(OutboundRefused, match="resolves to 10.0.0.9"):
        execute(plan("hf:org/tiny/tiny.gguf", settings), settings)
    assert hub.requests == []


def test_the_loopback_test_is_ip_aware():
    for host in ("localhost", "LOCALHOST.", "127.0.0.1", "127.8.9.10", "::1", "[::1]", "::ffff:127.0.0.1"):
        assert net.is_loopback(host), host
    for host in ("127.0.0.1.example.com", "10.0.0.1", "::2", "example.com", "", "0.0.0.0"):
        assert not net.is_loopback(host), host
