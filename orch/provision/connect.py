"""Connections that go where the outbound policy looked: each one resolves its host once,
has every address judged (``policy.checked_addresses``) and connects to a judged address,
never to the name again. Used by the https/http download (urllib) and by huggingface-hub's
client (httpx), for every request including each redirect. Plain Python."""

from __future__ import annotations

import http.client
import socket
import ssl
import urllib.request
from typing import Any, Callable, Optional

from orch.core import net
from orch.provision.policy import Policy, checked_addresses

#: ``gate(host, port) -> addresses``: the judged addresses to connect to, or OutboundRefused.
Gate = Callable[[str, int], list[str]]


def gate_for(policy: Policy) -> Gate:
    def gate(host: str, port: int) -> list[str]:
        return checked_addresses(host, port, policy)

    return gate


def _pinned(base: type, gate: Gate) -> Callable[..., http.client.HTTPConnection]:
    """An http.client connection class whose socket goes to a judged address; TLS still
    checks the certificate against the host name (``server_hostname`` is the name)."""

    def connect_checked(address: tuple[str, int], timeout: Any = socket._GLOBAL_DEFAULT_TIMEOUT,
                        source_address: Optional[tuple[str, int]] = None) -> socket.socket:
        host, port = address
        failure: Optional[OSError] = None
        for ip in gate(host, port):
            try:
                return socket.create_connection((ip, port), timeout, source_address)
            except OSError as exc:
                failure = exc
        assert failure is not None
        raise failure

    def make(*args: Any, **kwargs: Any) -> http.client.HTTPConnection:
        connection = base(*args, **kwargs)
        connection._create_connection = connect_checked
        return connection

    return make


class PinnedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, gate: Gate) -> None:
        super().__init__()
        self.gate = gate

    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_pinned(http.client.HTTPConnection, self.gate), req)


class PinnedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, context: ssl.SSLContext, gate: Gate) -> None:
        super().__init__(context=context)
        self.gate = gate

    def https_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_pinned(http.client.HTTPSConnection, self.gate), req, context=self._context)


def pinned_transport(httpx_module: Any, inner: Any, gate: Callable[[], Optional[Gate]]) -> Any:
    """An httpx transport that sends each request to a judged address of its host: the URL's
    host is swapped for the address for the connection only, with the name kept for TLS
    (``sni_hostname``) and in the Host header. ``gate()`` gives the gate in force (None: no
    provisioning is running in this process, nothing to judge)."""

    class PinnedTransport(httpx_module.BaseTransport):
        def handle_request(self, request: Any) -> Any:
            current = gate()
            url = request.url
            if current is None or net.ip_of(url.host) is not None:
                if current is not None:
                    current(url.host, url.port or (443 if url.scheme == "https" else 80))
                return inner.handle_request(request)
            address = current(url.host, url.port or (443 if url.scheme == "https" else 80))[0]
            request.extensions["sni_hostname"] = url.host
            request.url = url.copy_with(host=address)
            try:
                return inner.handle_request(request)
            finally:
                request.url = url  # redirects and logs see the name, not the address

        def close(self) -> None:
            inner.close()

    return PinnedTransport()
