"""Loopback HTTP(S) servers for provisioning tests: a file server with Range support and
fault injection, and a stand-in for the Hugging Face Hub's HTTP API (just enough of it for
huggingface-hub's real ``hf_hub_download`` and ``snapshot_download``). 127.0.0.1 only."""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

HOST = "127.0.0.1"


def make_tls_cert(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (it is its own CA): (cert PEM, key PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llama-orch test CA 127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class FileServer:
    """Serves ``files`` (URL path -> bytes) with Range/If-Range; ``redirects`` maps a path to
    a Location; ``cut_after`` makes the next N GETs of a path stop after that many bytes."""

    files: dict[str, bytes] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    cut_after: dict[str, int] = field(default_factory=dict)
    cuts_left: dict[str, int] = field(default_factory=dict)
    honour_range: bool = True
    #: path -> seconds to pause after each 256 KiB sent (a slow link)
    slow: dict[str, float] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    tls: Optional[tuple[Path, Path]] = None
    server: Optional[ThreadingHTTPServer] = None
    thread: Optional[threading.Thread] = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.server_address[1]

    def url(self, path: str) -> str:
        return f"{'https' if self.tls else 'http'}://{HOST}:{self.port}{path}"

    def start(self) -> "FileServer":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                self._answer(head=True)

            def do_GET(self) -> None:
                self._answer(head=False)

            def _answer(self, head: bool) -> None:
                path = self.path.split("?", 1)[0]
                owner.requests.append(Recorded(self.command, self.path, dict(self.headers.items())))
                if path in owner.redirects:
                    self.send_response(302)
                    self.send_header("Location", owner.redirects[path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = owner.files.get(path)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
                start = 0
                status = 200
                wanted = self.headers.get("Range")
                if_range = self.headers.get("If-Range")
                if wanted and owner.honour_range and (if_range is None or if_range == etag):
                    match = re.match(r"^bytes=(\d+)-$", wanted)
                    if not match or int(match.group(1)) >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    start = int(match.group(1))
                    status = 206
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", etag)
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if head:
                    return
                if owner.cuts_left.get(path, 0) > 0:
                    owner.cuts_left[path] -= 1
                    self.wfile.write(body[: owner.cut_after[path]])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                pause = owner.slow.get(path, 0.0)
                step = 256 * 1024 if pause else len(body) or 1
                for start_at in range(0, len(body), step):
                    self.wfile.write(body[start_at:start_at + step])
                    self.wfile.flush()
                    if pause:
                        time.sleep(pause)

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        if self.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(self.tls[0]), str(self.tls[1]))
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def gets(self, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == "GET" and r.path.split("?", 1)[0] == path]


@dataclass
class HubRepo:
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class HubStandIn:
    """Enough of the Hub's HTTP API for huggingface-hub's download code:
    ``HEAD|GET /{repo}/resolve/{revision}/{file}`` (X-Repo-Commit, ETag, Content-Length),
    ``GET /api/models/{repo}/revision/{revision}`` and ``GET /api/models/{repo}/tree/{revision}``."""

    repos: dict[str, HubRepo] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    server: Optional[ThreadingHTTPServer] = None
    #: file name -> absolute URL its resolve answers redirect to (like the Hub's CDN redirects)
    cdn: dict[str, str] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        assert self.server is not None
        return f"http://{HOST}:{self.server.server_address[1]}"

    def start(self) -> "HubStandIn":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self._answer(head=True)

            def do_GET(self) -> None:
                self._answer(head=False)

            def _send(self, status: int, body: bytes = b"", headers: Optional[dict[str, str]] = None,
                      head: bool = False) -> None:
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head and body:
                    self.wfile.write(body)

            def _json(self, value) -> None:
                self._send(200, json.dumps(value).encode(), {"Content-Type": "application/json"})

            def _answer(self, head: bool) -> None:
                path = self.path.split("?", 1)[0]
                owner.requests.append(Recorded(self.command, self.path, dict(self.headers.items())))
                api = re.match(r"^/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)$", path)
                if api:
                    repo = owner.repos.get(api.group(1))
                    if repo is None:
                        self._send(404, b"", {"X-Error-Code": "RepoNotFound"}, head)
                        return
                    if api.group(2) == "revision":
                        self._json({"id": api.group(1), "sha": repo.commit,
                                    "siblings": [{"rfilename": name} for name in sorted(repo.files)]})
                    else:
                        self._json([{"type": "file", "path": name, "size": len(data),
                                     "oid": hashlib.sha1(data).hexdigest()} for name, data in sorted(repo.files.items())])
                    return
                resolve = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
                if not resolve:
                    self._send(404, b"", {}, head)
                    return
                repo = owner.repos.get(resolve.group(1))
                if repo is None:
                    self._send(404, b"", {"X-Error-Code": "RepoNotFound"}, head)
                    return
                if resolve.group(2) not in ("main", repo.commit):
                    self._send(404, b"", {"X-Error-Code": "RevisionNotFound"}, head)
                    return
                data = repo.files.get(resolve.group(3))
                if data is None:
                    self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit}, head)
                    return
                if resolve.group(3) in owner.cdn:
                    self._send(302, b"", {"Location": owner.cdn[resolve.group(3)], "X-Repo-Commit": repo.commit,
                                          "X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"',
                                          "X-Linked-Size": str(len(data))}, head)
                    return
                start = 0
                status = 200
                match = re.match(r"^bytes=(\d+)-$", self.headers.get("Range", ""))
                if match and int(match.group(1)) < len(data):
                    start, status = int(match.group(1)), 206
                headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                           "Accept-Ranges": "bytes"}
                if status == 206:
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                if head:
                    self._head(headers, len(data))
                else:
                    self._send(status, data[start:], headers)

            def _head(self, headers: dict[str, str], size: int) -> None:
                self.send_response(200)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(size))
                self.end_headers()

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
