"""Model provisioning: a deterministic plan for a ref, and the code that carries it out.
Plain Python, no Ray (``orch.provision.tasks`` runs ``execute`` as a Ray task on the target
node and stores the record in the catalog).

``plan`` checks the ref and the outbound policy and lists the steps, without touching the
network or the disk, so it can be shown (``dry_run``) and refused at once. ``execute`` runs
those steps in order:

- ``stage``: a ``file:``/``pkg:`` model is used where it lies; nothing is copied;
- ``download``: an ``https://`` file is streamed into ``<cache>/url/...`` through a
  ``.partial`` file that a retry resumes with an HTTP ``Range`` request; a digest mismatch
  removes it before it ever reaches its final name;
- ``hf_download`` / ``hf_snapshot``: huggingface-hub fetches into ``<cache>/hf`` (its own
  layout), offline when ``HF_HUB_OFFLINE`` is set;
- ``digest``: sha256 of the file (of a manifest of every file for a directory), checked
  against the one given, else computed and recorded as unverified;
- ``inspect``: GGUF header (or ``config.json``) metadata, the trained context;
- ``record``: the catalog record, Active.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import re
import ssl
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from orch.api.catalog import DIGEST_PATTERN
from orch.api.tasks import ID_PATTERN
from orch.catalog.gguf import GGUFError, is_gguf, read_gguf
from orch.core.model_ref import (
    FETCH_SCHEMES,
    ModelRef,
    ModelRefError,
    cache_path,
    default_model_id,
    ensure_under,
    format_ref,
    parse_ref,
    resolve_local,
    resolve_local_path,
    safe_join,
)
from orch.catalog.store import atomic_write
from orch.provision.errors import (
    BadModelFile,
    DigestMismatch,
    FetchFailed,
    InvalidRequest,
    OutboundRefused,
    ProvisionError,
    SourceNotFound,
    TLSFailed,
)
from orch.provision.policy import DEFAULT_HF_ENDPOINT, check_ref, check_url

log = logging.getLogger("orch.provision")

CHUNK_BYTES = 1 << 20
MAX_REDIRECTS = 5
MAX_MANIFEST_FILES = 100_000
#: Progress is reported at most this often (plus once at the end).
REPORT_EVERY_S = 0.25
_DIGEST = re.compile(DIGEST_PATTERN)
_MODEL_ID = re.compile(ID_PATTERN)
_COMMIT = re.compile(r"^[0-9a-f]{40}$")

#: ``report(done_bytes, total_bytes_or_None)``
Report = Callable[[int, Optional[int]], None]




@dataclass(frozen=True)
class ProvisionSettings:
    """What provisioning needs from the catalog config, as plain values (it satisfies the
    outbound ``Policy`` protocol)."""

    model_cache: str
    allow_downloads: bool = True
    allowed_hosts: tuple[str, ...] = ()
    allowed_schemes: tuple[str, ...] = FETCH_SCHEMES
    timeout_s: float = 30.0
    ca_bundle: Optional[str] = None
    hf_endpoint: Optional[str] = None
    #: Relative ``file:`` refs resolve against this directory.
    base_dir: Optional[str] = None
    #: Longest one provisioning may run.
    deadline_s: float = 3600.0

    @classmethod
    def from_config(cls, catalog: Any, base_dir: Optional[Path | str] = None) -> "ProvisionSettings":
        outbound = catalog.outbound
        return cls(
            model_cache=catalog.model_cache,
            allow_downloads=outbound.allow_downloads,
            allowed_hosts=tuple(outbound.allowed_hosts),
            allowed_schemes=tuple(outbound.allowed_schemes),
            timeout_s=outbound.timeout_s,
            ca_bundle=outbound.ca_bundle,
            hf_endpoint=catalog.hf_endpoint,
            base_dir=str(base_dir) if base_dir is not None else None,
            deadline_s=catalog.provision_timeout_s,
        )

    def effective_hf_endpoint(self) -> str:
        return (self.hf_endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/")


@dataclass(frozen=True)
class Step:
    kind: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class ProvisionPlan:
    model_id: str
    ref: str
    source: str
    managed: bool
    steps: tuple[Step, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "ref": self.ref,
            "source": self.source,
            "managed": self.managed,
            "steps": [{"kind": step.kind, "detail": dict(step.detail)} for step in self.steps],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ProvisionPlan":
        return cls(data["model_id"], data["ref"], data["source"], data["managed"],
                   tuple(Step(s["kind"], dict(s["detail"])) for s in data["steps"]))


# --------------------------------------------------------------------------- plan


def catalog_ref(ref: ModelRef, base_dir: Optional[str]) -> str:
    """The ref as the catalog keys it: canonical, relative paths made absolute."""
    if ref.scheme == "file" and not os.path.isabs(ref.target):
        base = base_dir or os.getcwd()
        return "file:" + os.path.normpath(os.path.join(base, ref.target))
    return format_ref(ref)


def plan(raw_ref: str, settings: ProvisionSettings, *, model_id: Optional[str] = None,
         digest: Optional[str] = None) -> ProvisionPlan:
    """The steps that provision ``raw_ref``; raises ModelRefError, InvalidRequest,
    OutboundRefused or ProvisionUnsupported before anything runs."""
    ref = parse_ref(raw_ref)
    key = catalog_ref(ref, settings.base_dir)
    model_id = model_id or default_model_id(key)
    if not _MODEL_ID.match(model_id):
        raise InvalidRequest(f"model id {model_id[:80]!r} must be 1-128 letters, digits and . _ : -")
    if digest is not None and not _DIGEST.match(digest):
        raise InvalidRequest(f"digest {digest[:80]!r} must be 'sha256:' followed by 64 lowercase hex digits")
    hf_endpoint = settings.effective_hf_endpoint()
    check_ref(ref, settings, hf_endpoint)

    managed = not ref.is_local
    steps: list[Step] = []
    if ref.scheme == "pkg":
        package, _, filename = ref.target.partition("/")
        steps.append(Step("stage", {"package": package, "file": filename, "copy": False}))
    elif ref.scheme == "file":
        steps.append(Step("stage", {"path": key[len("file:"):], "copy": False}))
    elif ref.scheme in ("https", "http"):
        steps.append(Step("check_policy", {"url": ref.url, "host": ref.host}))
        steps.append(Step("download", {
            "url": ref.url,
            "to": str(cache_path(ref, settings.model_cache)),
            "resume": "HTTP Range from the .partial file a failed attempt left",
            "timeout_s": settings.timeout_s,
            "expected_digest": digest,
        }))
    elif ref.scheme == "hf":
        endpoint_host = re.sub(r"^https?://", "", hf_endpoint).split("/", 1)[0]
        steps.append(Step("check_policy", {"url": hf_endpoint, "host": endpoint_host}))
        detail = {
            "repo": ref.repo,
            "revision": ref.revision or "main",
            "endpoint": hf_endpoint,
            "cache_dir": str(safe_join(settings.model_cache, "hf")),
            "offline": "honoured when HF_HUB_OFFLINE is set on the node",
            "timeout_s": settings.timeout_s,
        }
        if ref.path:
            steps.append(Step("hf_download", dict(detail, file=ref.path)))
        else:
            steps.append(Step("hf_snapshot", detail))
    steps.append(Step("digest", {"algorithm": "sha256", "expected": digest,
                                 "of": "a manifest of every file" if ref.scheme == "hf" and not ref.path else "the file"}))
    steps.append(Step("inspect", {"reads": "GGUF header, or config.json for a directory"}))
    steps.append(Step("record", {"model_id": model_id, "ref": key, "state": "Active", "managed": managed}))
    return ProvisionPlan(model_id, key, ref.scheme, managed, tuple(steps))


# --------------------------------------------------------------------------- execute


class _Throttled:
    """Calls ``report`` at most every REPORT_EVERY_S, from any thread, plus ``flush`` at the end."""

    def __init__(self, report: Optional[Report]) -> None:
        self.report = report
        self.lock = threading.Lock()
        self.last = 0.0
        self.done = 0
        self.total: Optional[int] = None

    def __call__(self, done: int, total: Optional[int]) -> None:
        if self.report is None:
            return
        with self.lock:
            self.done, self.total = done, total
            now = time.monotonic()
            if now - self.last < REPORT_EVERY_S:
                return
            self.last = now
        self._send(done, total)

    def flush(self) -> None:
        if self.report is not None:
            self._send(self.done, self.total)

    def _send(self, done: int, total: Optional[int]) -> None:
        try:
            self.report(done, total)
        except Exception as exc:  # progress is best effort; never fail a download over it
            log.debug("progress report failed: %s", exc)


@dataclass
class _Work:
    plan: ProvisionPlan
    settings: ProvisionSettings
    progress: _Throttled
    node_id: Optional[str]
    started: float = field(default_factory=time.monotonic)
    path: Optional[Path] = None
    digest: Optional[str] = None
    size: Optional[int] = None
    verified: bool = False
    revision: Optional[str] = None
    format: str = "file"
    ctx_max: Optional[int] = None
    metadata: dict[str, Any] = field(default_factory=dict)
    record: Optional[dict[str, Any]] = None

    @property
    def deadline(self) -> float:
        return self.started + self.settings.deadline_s

    def discard(self) -> None:
        """Remove what this run fetched into the cache (never a user's own file)."""
        if self.plan.managed and self.path is not None:
            remove_managed(self.path, self.settings.model_cache)


def execute(plan_: ProvisionPlan, settings: ProvisionSettings, report: Optional[Report] = None,
            node_id: Optional[str] = None) -> dict[str, Any]:
    """Run a plan's steps; returns the catalog record (not yet stored)."""
    work = _Work(plan_, settings, _Throttled(report), node_id)
    for step in plan_.steps:
        handler = _HANDLERS.get(step.kind)
        if handler is None:
            raise InvalidRequest(f"plan step '{step.kind}' is unknown to this release")
        handler(work, step.detail)
    work.progress.flush()
    assert work.record is not None
    return work.record


def _stage(work: _Work, detail: dict[str, Any]) -> None:
    try:
        if "package" in detail:
            work.path = resolve_local(f"pkg:{detail['package']}/{detail['file']}")
        else:
            work.path = resolve_local_path("file:" + detail["path"])
    except ModelRefError as exc:
        raise SourceNotFound(str(exc)) from None


def _check_policy(work: _Work, detail: dict[str, Any]) -> None:
    check_url(detail["url"], work.settings)


def _download(work: _Work, detail: dict[str, Any]) -> None:
    dest = Path(detail["to"])
    work.path, work.digest, work.size = download(
        detail["url"], dest, work.settings, expected_digest=detail.get("expected_digest"),
        report=work.progress, deadline=work.deadline,
    )
    work.verified = detail.get("expected_digest") is not None


def _hf_download(work: _Work, detail: dict[str, Any]) -> None:
    path = hf_fetch(detail, work.settings, work.progress, snapshot=False)
    work.path = path
    work.revision = _commit_of(path)


def _hf_snapshot(work: _Work, detail: dict[str, Any]) -> None:
    path = hf_fetch(detail, work.settings, work.progress, snapshot=True)
    work.path = path
    work.revision = _commit_of(path / "_")


def _digest(work: _Work, detail: dict[str, Any]) -> None:
    assert work.path is not None
    expected = detail.get("expected")
    if work.digest is None:
        work.digest, work.size = digest_path(work.path, work.progress, work.deadline)
    if expected is not None and work.digest != expected:
        work.discard()
        raise DigestMismatch(
            f"model '{work.plan.model_id}' ({work.plan.ref}): sha256 is {work.digest}, not the expected {expected}"
            + ("; the fetched file was removed" if work.plan.managed else "")
        )
    work.verified = expected is not None
    if expected is None:
        log.warning("model %s (%s): no digest was given; computed %s and recorded it as unverified",
                    work.plan.model_id, work.plan.ref, work.digest)


def _inspect(work: _Work, detail: dict[str, Any]) -> None:
    assert work.path is not None
    try:
        work.format, work.ctx_max, work.metadata = inspect_model(work.path)
    except GGUFError as exc:
        work.discard()
        raise BadModelFile(f"model '{work.plan.model_id}' ({work.plan.ref}): {exc}") from None


def _record(work: _Work, detail: dict[str, Any]) -> None:
    assert work.path is not None and work.digest is not None and work.size is not None
    work.record = {
        "id": detail["model_id"],
        "ref": detail["ref"],
        "source": work.plan.source,
        "local_path": str(work.path),
        "node_id": work.node_id,
        "managed": work.plan.managed,
        "digest": work.digest,
        "digest_verified": work.verified,
        "size_bytes": work.size,
        "ctx_max": work.ctx_max,
        "format": work.format,
        "metadata": work.metadata,
        "revision": work.revision,
        "state": detail.get("state", "Active"),
    }


_HANDLERS: dict[str, Callable[[_Work, dict[str, Any]], None]] = {
    "stage": _stage,
    "check_policy": _check_policy,
    "download": _download,
    "hf_download": _hf_download,
    "hf_snapshot": _hf_snapshot,
    "digest": _digest,
    "inspect": _inspect,
    "record": _record,
}


# --------------------------------------------------------------------------- digests, metadata


def sha256_file(path: Path, hasher: Optional[Any] = None, *, progress: Optional[Callable[[int], None]] = None,
                deadline: Optional[float] = None) -> Any:
    hasher = hasher or hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(CHUNK_BYTES)
            if not chunk:
                return hasher
            hasher.update(chunk)
            if progress is not None:
                progress(len(chunk))
            if deadline is not None and time.monotonic() > deadline:
                raise FetchFailed(f"hashing {path} ran past the provisioning deadline")


def _manifest_files(root: Path) -> list[tuple[str, Path]]:
    files: list[tuple[str, Path]] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = Path(folder) / name
            if path.is_file():
                files.append((path.relative_to(root).as_posix(), path))
                if len(files) > MAX_MANIFEST_FILES:
                    raise BadModelFile(f"{root} holds more than {MAX_MANIFEST_FILES} files")
    return sorted(files)


def digest_path(path: Path, report: Optional[Report] = None, deadline: Optional[float] = None) -> tuple[str, int]:
    """``(sha256:<hex>, size)`` of a file, or of a directory's manifest (one line per file,
    sorted: ``<sha256 hex>  <relative path>``; hidden files skipped)."""
    path = Path(path)
    if path.is_dir():
        files = _manifest_files(path)
        total = sum(p.stat().st_size for _, p in files)
        done = 0
        lines = []
        for rel, file in files:
            def bump(n: int) -> None:
                nonlocal done
                done += n
                if report:
                    report(done, total)
            lines.append(f"{sha256_file(file, progress=bump, deadline=deadline).hexdigest()}  {rel}\n")
        return "sha256:" + hashlib.sha256("".join(lines).encode()).hexdigest(), total
    if not path.is_file():
        raise SourceNotFound(f"no model file at {path}")
    total = path.stat().st_size
    done = 0

    def bump_file(n: int) -> None:
        nonlocal done
        done += n
        if report:
            report(done, total)
    return "sha256:" + sha256_file(path, progress=bump_file, deadline=deadline).hexdigest(), total


_HF_CONFIG_KEYS = ("architectures", "model_type", "max_position_embeddings", "torch_dtype", "vocab_size")


def inspect_model(path: Path) -> tuple[str, Optional[int], dict[str, Any]]:
    """``(format, ctx_max, metadata)`` from a GGUF header or an HF checkpoint's config.json."""
    path = Path(path)
    if path.is_file():
        if is_gguf(path):
            info = read_gguf(path)
            return "gguf", info.context_length, info.to_dict()
        return "file", None, {}
    metadata: dict[str, Any] = {}
    ctx_max = None
    config = path / "config.json"
    if config.is_file() and config.stat().st_size < 4 * 1024 * 1024:
        try:
            data = json.loads(config.read_bytes())
        except ValueError:
            data = {}
        if isinstance(data, dict):
            metadata = {key: data[key] for key in _HF_CONFIG_KEYS if key in data}
            value = data.get("max_position_embeddings")
            ctx_max = value if isinstance(value, int) and value > 0 else None
    ggufs = sorted(rel for rel, _ in _manifest_files(path) if rel.endswith(".gguf"))
    if ggufs:
        metadata["gguf_files"] = ggufs[:64]
        if len(ggufs) == 1:
            info = read_gguf(path / ggufs[0])
            metadata["gguf"] = info.to_dict()
            ctx_max = ctx_max or info.context_length
    return "directory", ctx_max, metadata


# --------------------------------------------------------------------------- https download


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


def _open(url: str, headers: dict[str, str], settings: ProvisionSettings):
    check_url(url, settings)
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=_ssl_context(settings)), _GatedRedirects(settings)
    )
    request = urllib.request.Request(url, headers=headers, method="GET")
    return opener.open(request, timeout=settings.timeout_s)


def _partial_meta(partial: Path) -> Path:
    return partial.with_name(partial.name + ".json")


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
    meta_path = _partial_meta(partial)

    if dest.is_file() and expected_digest is not None:
        digest, size = digest_path(dest, report, deadline)
        if digest == expected_digest:
            return dest, digest, size
        dest.unlink()

    validator = None
    offset = 0
    if partial.is_file():
        try:
            meta = json.loads(meta_path.read_bytes())
        except (OSError, ValueError):
            meta = {}
        if meta.get("url") == url:
            offset = partial.stat().st_size
            validator = meta.get("etag") or meta.get("last_modified")
        else:
            partial.unlink()
    for attempt in range(2):  # a second attempt only after a refused range (416)
        headers = {"User-Agent": "llama-orch", "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if validator:
                headers["If-Range"] = validator
        try:
            response = _open(url, headers, settings)
        except OutboundRefused:
            raise
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 416 and offset and attempt == 0:
                partial.unlink(missing_ok=True)
                offset, validator = 0, None
                continue
            if exc.code in (408, 429) or exc.code >= 500:
                raise FetchFailed(f"{url}: the server answered {exc.code} {exc.reason}; retry later") from None
            raise SourceNotFound(f"{url}: the server answered {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLError):
                raise TLSFailed(f"{url}: TLS verification failed ({reason}); for a private mirror set "
                                "catalog.outbound.ca_bundle to its CA's PEM file") from None
            raise FetchFailed(f"{url}: {reason}") from None
        break
    else:  # pragma: no cover - the loop always breaks or raises
        raise FetchFailed(f"{url}: the download could not start")

    with response:
        status = response.status
        length = response.headers.get("Content-Length")
        if status == 206:
            start = _content_range_start(response.headers.get("Content-Range", ""))
            if start != offset:
                raise FetchFailed(f"{url}: the server resumed at byte {start}, not {offset}; retry")
        else:
            offset = 0
        total = offset + int(length) if length and length.isdigit() else None
        hasher = hashlib.sha256()
        if offset:
            sha256_file(partial, hasher, deadline=deadline)
        meta = {"url": url, "etag": response.headers.get("ETag"), "last_modified": response.headers.get("Last-Modified")}
        atomic_write(meta_path, json.dumps(meta).encode())
        done = offset
        try:
            with open(partial, "ab" if offset else "wb") as handle:
                while True:
                    chunk = response.read(CHUNK_BYTES)
                    if not chunk:
                        break
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
    digest = "sha256:" + hasher.hexdigest()
    if expected_digest is not None and digest != expected_digest:
        partial.unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)
        raise DigestMismatch(f"{url}: sha256 is {digest}, not the expected {expected_digest}; the file was removed")
    os.replace(partial, dest)
    meta_path.unlink(missing_ok=True)
    if report:
        report(done, done)
    return dest, digest, done


def _content_range_start(value: str) -> Optional[int]:
    match = re.match(r"^bytes (\d+)-\d+/(?:\d+|\*)$", value.strip())
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------- Hugging Face


_HF_LOCK = threading.Lock()
_hf_gate: Optional[Callable[[str], None]] = None
_hf_client_key: Optional[tuple[float, Optional[str]]] = None


def _hf_request_gate(request: Any) -> None:
    gate = _hf_gate
    if gate is not None:
        gate(str(request.url))


def _hf_client_factory(timeout_s: float, ca_bundle: Optional[str]) -> Callable[[], Any]:
    """huggingface-hub's client, plus the outbound gate on every request (redirects included)
    and a finite timeout on every call (its own default waits forever on some calls)."""
    import httpx2
    from huggingface_hub.utils._http import hf_request_event_hook

    class FiniteTimeouts(httpx2.BaseTransport):
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def handle_request(self, request: Any) -> Any:
            given = request.extensions.get("timeout") or {}
            request.extensions["timeout"] = {
                key: given.get(key) if given.get(key) is not None else timeout_s
                for key in ("connect", "read", "write", "pool")
            }
            return self.inner.handle_request(request)

        def close(self) -> None:
            self.inner.close()

    def factory() -> Any:
        verify: Any = ssl.create_default_context(cafile=ca_bundle) if ca_bundle else True
        return httpx2.Client(
            event_hooks={"request": [hf_request_event_hook, _hf_request_gate]},
            follow_redirects=True,
            timeout=httpx2.Timeout(timeout_s),
            transport=FiniteTimeouts(httpx2.HTTPTransport(verify=verify)),
        )

    return factory


@contextlib.contextmanager
def _hf_session(settings: ProvisionSettings) -> Iterator[None]:
    global _hf_gate, _hf_client_key
    import huggingface_hub

    with _HF_LOCK:
        key = (settings.timeout_s, settings.ca_bundle)
        if _hf_client_key != key:
            huggingface_hub.set_client_factory(_hf_client_factory(*key))
            _hf_client_key = key
        _hf_gate = lambda url: check_url(url, settings)  # noqa: E731
        try:
            yield
        finally:
            _hf_gate = None


def _progress_class(progress: _Throttled) -> type:
    """A tqdm that reports bytes to ``progress`` and draws nothing."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    lock = threading.Lock()
    counted = {"done": 0}

    class Progress(hf_tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._counts = kwargs.get("unit") == "B" and not str(kwargs.get("name") or "").endswith(".transfer")
            self._own_total = kwargs.get("total")
            initial = kwargs.get("initial") or 0
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            if self._counts and initial:
                self._add(int(initial))

        def _add(self, n: int) -> None:
            with lock:
                counted["done"] += n
                done = counted["done"]
            total = self.total if isinstance(self.total, (int, float)) and self.total else None
            progress(done, int(total) if total else None)

        def update(self, n: Any = 1) -> Any:
            if self._counts and n:
                self._add(int(n))
            return super().update(n)

    return Progress


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hf_fetch(detail: dict[str, Any], settings: ProvisionSettings, progress: _Throttled, *, snapshot: bool) -> Path:
    """One file (``hf_hub_download``) or a whole repository (``snapshot_download``) into the
    cache; offline (cache only) when ``HF_HUB_OFFLINE`` is set."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub import errors as hf_errors

    cache_dir = Path(detail["cache_dir"])
    ensure_under(settings.model_cache, cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    offline = _env_true("HF_HUB_OFFLINE")
    where = f"hf:{detail['repo']}" + (f"/{detail['file']}" if "file" in detail else "")
    common = dict(
        repo_id=detail["repo"], revision=detail["revision"], cache_dir=str(cache_dir), endpoint=detail["endpoint"],
        local_files_only=offline, etag_timeout=settings.timeout_s, tqdm_class=_progress_class(progress),
    )
    try:
        with _hf_session(settings):
            if snapshot:
                result = snapshot_download(**common, max_workers=2)
            else:
                result = hf_hub_download(filename=detail["file"], **common)
    except ProvisionError:
        raise
    except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError, hf_errors.RemoteEntryNotFoundError,
            hf_errors.GatedRepoError) as exc:
        raise SourceNotFound(f"{where}: {_first_line(exc)}") from None
    except hf_errors.LocalEntryNotFoundError as exc:
        if offline:
            raise SourceNotFound(f"{where}: HF_HUB_OFFLINE is set and it is not in the cache ({cache_dir})") from None
        raise FetchFailed(f"{where}: the Hub could not be reached and it is not cached: {_first_line(exc)}") from None
    except (OSError, ValueError) as exc:
        raise FetchFailed(f"{where}: {_first_line(exc)}") from None
    path = Path(str(result))
    ensure_under(cache_dir, path)
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def _commit_of(path: Path) -> Optional[str]:
    parts = Path(path).parts
    for index, part in enumerate(parts[:-1]):
        if part == "snapshots" and _COMMIT.match(parts[index + 1]):
            return parts[index + 1]
    return None


# --------------------------------------------------------------------------- removal


def _blob_referenced(blob: Path, repo_folder: Path, skip: set[Path]) -> bool:
    snapshots = repo_folder / "snapshots"
    if not snapshots.is_dir():
        return False
    for folder, _, names in os.walk(snapshots):
        for name in names:
            link = Path(folder) / name
            if link in skip or not link.is_symlink():
                continue
            try:
                if link.resolve() == blob:
                    return True
            except OSError:
                continue
    return False


def remove_managed(path: Path | str, model_cache: Path | str) -> list[str]:
    """Delete files the catalog fetched into ``model_cache``: a downloaded file, an hf
    snapshot pointer with its blob (unless another snapshot still links to it), or a whole
    snapshot directory. Anything outside the cache is refused. Returns what was removed."""
    root = Path(model_cache).resolve()
    raw = Path(os.path.abspath(path))
    path = ensure_under(root, raw.parent) / raw.name
    if path == root or root not in path.parents:
        raise ModelRefError(f"{raw} is not inside the model cache {root}; refusing to delete it")
    removed: list[str] = []
    pointers: list[Path] = []
    if path.is_dir() and not path.is_symlink():
        for folder, _, names in os.walk(path):
            pointers += [Path(folder) / name for name in names]
    elif path.exists() or path.is_symlink():
        pointers.append(path)
    skip = set(pointers)
    for pointer in pointers:
        if pointer.is_symlink():
            try:
                blob: Optional[Path] = ensure_under(root, pointer)
            except ModelRefError:
                blob = None
            pointer.unlink()
            removed.append(str(pointer))
            if blob is not None and blob.is_file() and blob.parent.name == "blobs":
                if not _blob_referenced(blob, blob.parent.parent, skip):
                    blob.unlink()
                    removed.append(str(blob))
        elif pointer.is_file():
            ensure_under(root, pointer)
            pointer.unlink()
            removed.append(str(pointer))
    for leftover in (path.with_name(path.name + ".partial"), path.with_name(path.name + ".partial.json")):
        if leftover.is_file():
            leftover.unlink()
            removed.append(str(leftover))
    _prune_empty(path, root)
    return removed


def _prune_empty(start: Path, root: Path) -> None:
    """Remove empty directories at and above ``start``, up to (not including) the cache root."""
    if start.is_dir() and not start.is_symlink():
        for folder, _, _ in os.walk(start, topdown=False):
            with contextlib.suppress(OSError):
                Path(folder).rmdir()
    current = start
    for _ in range(64):
        if current == root or root not in current.parents:
            return
        if current.exists():
            try:
                current.rmdir()
            except OSError:
                return
        current = current.parent
