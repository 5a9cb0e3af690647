"""The ``https://`` (and loopback ``http://``) fetcher: a file streamed into the model cache
through a ``.partial`` file that a retry resumes with an HTTP ``Range`` request; a digest
mismatch removes it before it ever reaches its final name. Every connection, redirects
included, goes through the outbound policy (orch/provision/connect.py). Plain Python."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from orch.core.files import atomic_write
from orch.core.model_ref import ensure_under
from orch.provision.connect import PinnedHTTPHandler, PinnedHTTPSHandler, gate_for
from orch.provision.errors import DigestMismatch, FetchFailed, OutboundRefused, SourceNotFound, TLSFailed
from orch.provision.files import digest_path, sha256_file
from orch.provision.policy import check_url
from orch.provision.settings import CHUNK_BYTES, ProvisionSettings, Report

MAX_REDIRECTS = 5


class _GatedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows at most MAX_REDIRECTS redirects, each one through the outbound policy."""

    max_redirections = MAX_REDIRECTS

    def __init__(self, settings: ProvisionSettings) -> None:
        self.settings = settings

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D401 (urllib's signature)
        check_url(newurl, self.settings, came_from=req.full_url)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _ssl_context(settings: ProvisionSettings) -> ssl.SSLContext:
    if settings.ca_bundle:
        return ssl.create_default_context(cafile=settings.ca_bundle)
    return ssl.create_default_context()


def open_url(url: str, headers: dict[str, str], settings: ProvisionSettings) -> Any:
    """One GET through the policy: the URL is judged, then each connection's addresses."""
    check_url(url, settings)
    gate = gate_for(settings)
    opener = urllib.request.build_opener(
        PinnedHTTPHandler(gate), PinnedHTTPSHandler(_ssl_context(settings), gate), _GatedRedirects(settings)
    )
    request = urllib.request.Request(url, headers=headers, method="GET")
    return opener.open(request, timeout=settings.timeout_s)


@dataclass
class _Resume:
    offset: int = 0
    validator: Optional[str] = None


def _partial_meta(partial: Path) -> Path:
    return partial.with_name(partial.name + ".json")


def _resume_point(url: str, partial: Path) -> _Resume:
    """Where an earlier attempt for the same URL stopped (its ``.partial`` and validator)."""
    if not partial.is_file():
        return _Resume()
    try:
        meta = json.loads(_partial_meta(partial).read_bytes())
    except (OSError, ValueError):
        meta = {}
    if meta.get("url") == url:
        return _Resume(partial.stat().st_size, meta.get("etag") or meta.get("last_modified"))
    partial.unlink()
    return _Resume()


def _start(url: str, settings: ProvisionSettings, partial: Path, resume: _Resume) -> Any:
    """The response to the (ranged) GET; a refused range (416) restarts from zero once."""
    for attempt in range(2):
        headers = {"User-Agent": "llama-orch", "Accept-Encoding": "identity"}
        if resume.offset:
            headers["Range"] = f"bytes={resume.offset}-"
            if resume.validator:
                headers["If-Range"] = resume.validator
        try:
            return open_url(url, headers, settings)
        except OutboundRefused:
            raise
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 416 and resume.offset and attempt == 0:
                partial.unlink(missing_ok=True)
                resume.offset, resume.validator = 0, None
                continue
            if exc.code in (408, 429) or exc.code >= 500:
                raise FetchFailed(f"{url}: the server answered {exc.code} {exc.reason}; retry later") from None
            raise SourceNotFound(f"{url}: the server answered {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, OutboundRefused):
                raise reason from None
            if isinstance(reason, ssl.SSLError):
                raise TLSFailed(f"{url}: TLS verification failed ({reason}); for a private mirror set "
                                "catalog.outbound.ca_bundle to its CA's PEM file") from None
            raise FetchFailed(f"{url}: {reason}") from None
    raise FetchFailed(f"{url}: the download could not start")  # pragma: no cover - the loop returns or raises


def _stream(url: str, response: Any, partial: Path, offset: int, report: Optional[Report],
            deadline: float) -> tuple[str, int]:
    """Append the body to ``partial``; returns ``(digest, size)`` of the whole file."""
    length = response.headers.get("Content-Length")
    total = offset + int(length) if length and length.isdigit() else None
    hasher = hashlib.sha256()
    if offset:
        sha256_file(partial, hasher, deadline=deadline)
    meta = {"url": url, "etag": response.headers.get("ETag"), "last_modified": response.headers.get("Last-Modified")}
    atomic_write(_partial_meta(partial), json.dumps(meta).encode())
    done = offset
    try:
        with open(partial, "ab" if offset else "wb") as handle:
            while chunk := response.read(CHUNK_BYTES):
                handle.write(chunk)
                hasher.update(chunk)
                done += len(chunk)
                if report:
                    report(done, total)
                if time.monotonic() > deadline:
                    raise FetchFailed(f"{url}: the download ran past the provisioning deadline; "
                                      f"{done} bytes kept, a retry resumes")
            handle.flush()
            os.fsync(handle.fileno())
    except (OSError, ValueError, http.client.HTTPException) as exc:  # timeouts, resets: keep the partial
        raise FetchFailed(f"{url}: the download broke after {done} bytes ({exc}); a retry resumes") from None
    if total is not None and done != total:
        raise FetchFailed(f"{url}: got {done} of {total} bytes; a retry resumes")
    return "sha256:" + hasher.hexdigest(), done


def download(url: str, dest: Path, settings: ProvisionSettings, *, expected_digest: Optional[str] = None,
             report: Optional[Report] = None, deadline: Optional[float] = None) -> tuple[Path, str, int]:
    """Fetch ``url`` to ``dest`` (under the model cache); returns ``(dest, digest, size)``.

    Bytes go to ``dest.partial`` first. A ``.partial`` left by an earlier attempt for the same
    URL is resumed with ``Range`` (and ``If-Range`` when the server gave a validator); a server
    that ignores the range restarts from zero. The digest is checked before the rename, so a
    mismatch never leaves a file at ``dest``: both files are removed and DigestMismatch raised.
    """
    cache_root = Path(settings.model_cache)
    deadline = deadline if deadline is not None else time.monotonic() + settings.deadline_s
    ensure_under(cache_root, dest.parent)  # before creating anything: no symlink may lead out
    dest.parent.mkdir(parents=True, exist_ok=True)
    ensure_under(cache_root, dest.parent)
    partial = dest.with_name(dest.name + ".partial")
    if dest.is_file() and expected_digest is not None:
        digest, size = digest_path(dest, report, deadline)
        if digest == expected_digest:
            return dest, digest, size
        dest.unlink()
    resume = _resume_point(url, partial)
    response = _start(url, settings, partial, resume)
    with response:
        if response.status == 206:
            start = _content_range_start(response.headers.get("Content-Range", ""))
            if start != resume.offset:
                raise FetchFailed(f"{url}: the server resumed at byte {start}, not {resume.offset}; retry")
        else:
            resume.offset = 0
        digest, done = _stream(url, response, partial, resume.offset, report, deadline)
    if expected_digest is not None and digest != expected_digest:
        partial.unlink(missing_ok=True)
        _partial_meta(partial).unlink(missing_ok=True)
        raise DigestMismatch(f"{url}: sha256 is {digest}, not the expected {expected_digest}; the file was removed")
    os.replace(partial, dest)
    _partial_meta(partial).unlink(missing_ok=True)
    if report:
        report(done, done)
    return dest, digest, done


def _content_range_start(value: str) -> Optional[int]:
    match = re.match(r"^bytes (\d+)-\d+/(?:\d+|\*)$", value.strip())
    return int(match.group(1)) if match else None
