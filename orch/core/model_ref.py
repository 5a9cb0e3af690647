"""Model references: parsed in one place, resolved locally, and mapped into the model cache.

Forms (``ACCEPTED_FORMS``):

- ``hf:<org>/<repo>[@<revision>]/<path/to/file>``: one file of a Hugging Face repository;
- ``hf:<org>/<repo>[@<revision>]``: a whole repository (a snapshot);
- ``https://host[:port]/path``: one file over HTTPS;
- ``http://127.0.0.1[:port]/path``: plain HTTP, loopback hosts only (a local mirror), since a
  model fetched in clear text over a network can be swapped in transit;
- ``s3://bucket/key`` and ``oci://registry/repo:tag`` (or ``@sha256:<hex>``): parsed so that
  configs can name them; provisioning them is not supported yet;
- ``pkg:<python package>/<file>``: a file shipped inside an installed package (the embedded
  default);
- ``file:/abs/path``, ``file:relative/path``, ``/abs/path``, ``relative/path``.

``parse_ref`` accepts every form; ``parse_model_ref`` and ``resolve_local`` accept only the
forms that resolve without fetching. A cache path is only ever built from validated
segments joined under the cache root (``safe_join``), so no ref can name a file outside it.
Plain Python, no Ray.
"""

from __future__ import annotations

import hashlib
import importlib.util
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlsplit

from orch.core.net import is_loopback

LOCAL_FORMS = "pkg:<package>/<file>, file:/abs/path, file:relative/path, /abs/path, relative/path"
ACCEPTED_FORMS = (
    "hf:<org>/<repo>[@<revision>]/<path/to/file>, hf:<org>/<repo>[@<revision>], https://host/path, "
    "http://127.0.0.1/path (loopback only), s3://bucket/key, oci://registry/repo:tag, " + LOCAL_FORMS
)
#: Schemes whose refs are fetched over the network.
FETCH_SCHEMES = ("hf", "https", "http", "s3", "oci")
LOCAL_SCHEMES = ("pkg", "file")
MAX_REF_LENGTH = 2048

_PACKAGE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HF_NAME = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?$")
_REVISION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=,-]{0,254}$")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_OCI_REPO_PART = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_OCI_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_OCI_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_URL_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_SEGMENTS = 32


class ModelRefError(ValueError):
    """A model ref that cannot be used; the message names the accepted forms."""


@dataclass(frozen=True)
class ModelRef:
    """A parsed ref. ``target`` is everything after ``<scheme>:`` (the path for plain paths);
    the optional fields hold the parts of the remote forms."""

    scheme: str
    target: str
    raw: str
    #: hf: ``org/repo``; s3: the bucket; oci: the repository path.
    repo: Optional[str] = None
    #: hf: the file inside the repository (None: the whole repository); s3: the key;
    #: http(s): the URL path, without its leading ``/``.
    path: Optional[str] = None
    #: hf: the revision (branch, tag or commit); oci: the tag or digest.
    revision: Optional[str] = None
    #: http(s): the lowercase host; oci: the registry (``host[:port]``).
    host: Optional[str] = None
    port: Optional[int] = None
    query: Optional[str] = None

    @property
    def is_local(self) -> bool:
        return self.scheme in LOCAL_SCHEMES

    @property
    def canonical(self) -> str:
        return format_ref(self)

    @property
    def url(self) -> Optional[str]:
        """The URL an http(s) ref is fetched from."""
        if self.scheme not in ("https", "http"):
            return None
        return format_ref(self)


def _refuse(raw: object, why: str) -> ModelRefError:
    return ModelRefError(f"model ref {raw!r}: {why}; accepted forms: {ACCEPTED_FORMS}")


def parse_ref(raw: str) -> ModelRef:
    """Parse any accepted form; raises ModelRefError (naming the accepted forms) otherwise."""
    if not isinstance(raw, str) or not raw.strip():
        raise _refuse(raw, "empty or not a string")
    if len(raw) > MAX_REF_LENGTH:
        raise _refuse(raw[:80] + "...", f"longer than {MAX_REF_LENGTH} characters")
    if "\x00" in raw:
        raise _refuse(raw, "contains a NUL character")
    if raw.startswith("pkg:"):
        return _parse_pkg(raw)
    if raw.startswith("file:"):
        return ModelRef("file", raw[5:], raw)
    if raw.startswith("hf:"):
        return _parse_hf(raw)
    if raw.startswith("s3:"):
        return _parse_s3(raw)
    if raw.startswith("oci:"):
        return _parse_oci(raw)
    lowered = raw[:8].lower()
    if lowered.startswith(("https://", "http://")):
        return _parse_url(raw)
    if _URL_LIKE.match(raw):
        scheme = raw.split(":", 1)[0]
        raise _refuse(raw, f"scheme '{scheme}' is not supported")
    return ModelRef("file", raw, raw)


def parse_model_ref(raw: str) -> ModelRef:
    """Parse a ref that resolves without fetching (``pkg:``, ``file:``, paths).

    Remote forms are refused here: they must be provisioned into the catalog first.
    """
    if not isinstance(raw, str) or not raw.strip() or "\x00" in raw:
        raise ModelRefError(f"model ref {raw!r} is empty or malformed; accepted forms: {ACCEPTED_FORMS}")
    ref = parse_ref(raw)
    if not ref.is_local:
        raise ModelRefError(
            f"model ref {raw!r} needs fetching, which the local resolver does not do; provision it into the "
            f"catalog (POST /v2/catalog/models) first; local forms: {LOCAL_FORMS}; accepted forms: {ACCEPTED_FORMS}"
        )
    return ref


def _parse_pkg(raw: str) -> ModelRef:
    body = raw[4:]
    package, _, filename = body.partition("/")
    if not _PACKAGE.match(package) or not filename or "/" in filename or filename in (".", "..") or "\\" in filename:
        raise ModelRefError(f"model ref {raw!r}: expected pkg:<package>/<file>; accepted forms: {ACCEPTED_FORMS}")
    return ModelRef("pkg", body, raw)


def _check_segments(raw: str, segments: list[str], what: str) -> None:
    if not segments or len(segments) > _MAX_SEGMENTS:
        raise _refuse(raw, f"{what} must have 1 to {_MAX_SEGMENTS} path segments")
    for segment in segments:
        if segment in ("", ".", ".."):
            raise _refuse(raw, f"{what} has an empty, '.' or '..' segment")
        if not _SEGMENT.match(segment):
            raise _refuse(
                raw, f"{what} segment {segment!r} must be letters, digits and _ . + = , - (not starting with '.' or '-')"
            )


def _parse_hf(raw: str) -> ModelRef:
    body = raw[3:]
    if body.startswith("/") or "\\" in body or _CONTROL.search(body):
        raise _refuse(raw, "expected hf:<org>/<repo>[@<revision>][/<file>]")
    parts = body.split("/")
    if len(parts) < 2:
        raise _refuse(raw, "expected hf:<org>/<repo>[@<revision>][/<file>] (the org is required)")
    org, repo_rev, rest = parts[0], parts[1], parts[2:]
    repo, at, revision = repo_rev.partition("@")
    for name, what in ((org, "org"), (repo, "repository")):
        if not _HF_NAME.match(name) or "--" in name or ".." in name:
            raise _refuse(raw, f"hf {what} name {name!r} must be 1-96 letters, digits, _ . - (no '--' or '..')")
    if at and (not _REVISION.match(revision) or ".." in revision):
        raise _refuse(raw, f"hf revision {revision!r} must be a branch, tag or commit of letters, digits, _ . -")
    path = None
    if rest:
        if rest == [""]:
            raise _refuse(raw, "a trailing '/' names no file; drop it to name the whole repository")
        _check_segments(raw, rest, "hf file path")
        path = "/".join(rest)
    return ModelRef("hf", body, raw, repo=f"{org}/{repo}", path=path, revision=revision if at else None)


def _valid_host(host: str) -> bool:
    if _HOSTNAME.match(host):
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _parse_url(raw: str) -> ModelRef:
    if _CONTROL.search(raw) or "\\" in raw or any(ch.isspace() for ch in raw):
        raise _refuse(raw, "a URL may not contain whitespace, control characters or backslashes")
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError as exc:
        raise _refuse(raw, f"not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if "@" in parts.netloc:
        raise _refuse(raw, "credentials in a URL would be stored and logged; use a URL without user:password@")
    host = (parts.hostname or "").lower()
    if not host or not _valid_host(host):
        raise _refuse(raw, f"URL host {host!r} is not a valid host name or IP address")
    if port == 0:
        raise _refuse(raw, "URL port 0 is not valid")
    if parts.fragment or raw.endswith("#"):
        raise _refuse(raw, "a URL fragment ('#...') names no file")
    if scheme == "http" and not is_loopback(host):
        raise _refuse(raw, "plain http:// is accepted for loopback hosts only (a local mirror); use https://")
    path = parts.path
    if not path.startswith("/") or path == "/":
        raise _refuse(raw, "the URL names no file (its path is empty)")
    segments = path[1:].split("/")
    for segment in segments:
        decoded = unquote(segment)
        if decoded in ("", ".", "..") or "/" in decoded or "\\" in decoded or "\x00" in decoded:
            raise _refuse(raw, "URL path segments may not be empty, '.', '..' or encode '/' or '\\'")
    return _with_canonical_target(ModelRef(scheme, "", raw, path=path[1:], host=host, port=port,
                                           query=parts.query or None))


def _parse_s3(raw: str) -> ModelRef:
    if not raw.startswith("s3://"):
        raise _refuse(raw, "expected s3://bucket/key")
    body = raw[5:]
    bucket, _, key = body.partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise _refuse(raw, f"s3 bucket {bucket!r} must be 3-63 lowercase letters, digits, . and -")
    _check_segments(raw, key.split("/"), "s3 key")
    return ModelRef("s3", body, raw, repo=bucket, path=key)


def _parse_oci(raw: str) -> ModelRef:
    if not raw.startswith("oci://"):
        raise _refuse(raw, "expected oci://registry/repo:tag")
    body = raw[6:]
    registry, _, rest = body.partition("/")
    reg_host, colon, reg_port = registry.partition(":")
    if not reg_host or not _valid_host(reg_host.lower()) or (colon and not (reg_port.isdigit() and 0 < int(reg_port) < 65536)):
        raise _refuse(raw, f"oci registry {registry!r} must be host[:port]")
    if "@" in rest:
        repo, _, reference = rest.partition("@")
        if not _OCI_DIGEST.match(reference):
            raise _refuse(raw, "an oci digest must be sha256:<64 hex digits>")
    else:
        repo, colon, reference = rest.rpartition(":")
        if not colon or "/" in reference or not _OCI_TAG.match(reference):
            raise _refuse(raw, "expected oci://registry/repo:tag (the tag is required)")
    segments = repo.split("/")
    if not repo or len(segments) > _MAX_SEGMENTS or not all(_OCI_REPO_PART.match(s) for s in segments):
        raise _refuse(raw, f"oci repository {repo!r} must be lowercase path components")
    return _with_canonical_target(ModelRef("oci", "", raw, repo=repo, revision=reference, host=registry.lower()))


def _with_canonical_target(ref: ModelRef) -> ModelRef:
    """Set ``target`` from the canonical form, so equal refs compare equal whatever their case."""
    canonical = format_ref(ref)
    return ModelRef(ref.scheme, canonical[len(ref.scheme) + 1:], ref.raw, repo=ref.repo, path=ref.path,
                    revision=ref.revision, host=ref.host, port=ref.port, query=ref.query)


def format_ref(ref: ModelRef) -> str:
    """The canonical string of a ref; ``parse_ref(format_ref(r))`` has the same fields as r."""
    if ref.scheme == "pkg":
        return f"pkg:{ref.target}"
    if ref.scheme == "file":
        return f"file:{ref.target}"
    if ref.scheme == "hf":
        out = f"hf:{ref.repo}"
        if ref.revision is not None:
            out += f"@{ref.revision}"
        return out + (f"/{ref.path}" if ref.path else "")
    if ref.scheme in ("https", "http"):
        host = f"[{ref.host}]" if ref.host and ":" in ref.host else ref.host
        port = f":{ref.port}" if ref.port is not None else ""
        query = f"?{ref.query}" if ref.query else ""
        return f"{ref.scheme}://{host}{port}/{ref.path}{query}"
    if ref.scheme == "s3":
        return f"s3://{ref.repo}/{ref.path}"
    if ref.scheme == "oci":
        sep = "@" if ref.revision and ref.revision.startswith("sha256:") else ":"
        return f"oci://{ref.host}/{ref.repo}{sep}{ref.revision}"
    raise ModelRefError(f"unknown ref scheme {ref.scheme!r}")


def canonical_ref(raw: str) -> str:
    """The canonical form of any accepted ref string (the catalog's key for it)."""
    return format_ref(parse_ref(raw))


def catalog_ref(ref: ModelRef, base_dir: Optional[str]) -> str:
    """The ref as the catalog keys it: canonical, relative paths made absolute."""
    if ref.scheme == "file" and not os.path.isabs(ref.target):
        base = base_dir or os.getcwd()
        return "file:" + os.path.normpath(os.path.join(base, ref.target))
    return format_ref(ref)


# --------------------------------------------------------------------------- the model cache


def safe_join(root: Path | str, *segments: str) -> Path:
    """``root/segments...``, refusing any segment that could leave ``root``.

    Each segment is one path component: not empty, not ``.``/``..``, no ``/``, ``\\`` or NUL,
    not starting with ``~``. The result is checked to lie strictly under ``root``.
    """
    base = Path(os.path.abspath(root))
    for segment in segments:
        if (not isinstance(segment, str) or segment in ("", ".", "..") or "/" in segment or "\\" in segment
                or "\x00" in segment or segment.startswith("~") or _CONTROL.search(segment)):
            raise ModelRefError(f"cache path segment {segment!r} is not a plain file or directory name")
    path = base.joinpath(*segments)
    if os.path.commonpath([base, os.path.normpath(path)]) != str(base) or os.path.normpath(path) == str(base):
        raise ModelRefError(f"cache path {path} is not under the cache root {base}")
    return path


def ensure_under(root: Path | str, path: Path | str) -> Path:
    """``path`` with symlinks resolved, refused unless it lies under ``root`` (also resolved)."""
    base = Path(root).resolve()
    resolved = Path(path).resolve()
    if resolved != base and base not in resolved.parents:
        raise ModelRefError(f"{path} resolves to {resolved}, outside the model cache {base}")
    return resolved


def _file_name(segment: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", unquote(segment))[-128:].lstrip(".-")
    return name or "model"


def cache_segments(ref: ModelRef) -> tuple[str, ...]:
    """Where a fetched ref lives under the model cache, as validated path segments.

    hf: the directory handed to huggingface-hub as its cache (it owns the layout below);
    http(s): ``url/<host>[_<port>]/<sha256 of the URL, 16 hex>/<file name>``;
    s3: ``s3/<bucket>/<key...>``; oci: ``oci/<registry>/<repo...>/<tag or digest>``.
    """
    if ref.scheme == "hf":
        return ("hf",)
    if ref.scheme in ("https", "http"):
        host = (ref.host or "").replace(":", "_") + (f"_{ref.port}" if ref.port else "")
        digest = hashlib.sha256(format_ref(ref).encode()).hexdigest()[:16]
        return ("url", host, digest, _file_name((ref.path or "").rsplit("/", 1)[-1]))
    if ref.scheme == "s3":
        return ("s3", ref.repo or "", *(ref.path or "").split("/"))
    if ref.scheme == "oci":
        return ("oci", (ref.host or "").replace(":", "_"), *(ref.repo or "").split("/"),
                (ref.revision or "").replace(":", "_"))
    raise ModelRefError(f"model ref {ref.raw!r} is local; it is used where it lies, not cached")


def cache_path(ref: ModelRef | str, root: Path | str) -> Path:
    """The absolute cache path of a fetched ref, always under ``root``."""
    ref = parse_ref(ref) if isinstance(ref, str) else ref
    return safe_join(root, *cache_segments(ref))


# --------------------------------------------------------------------------- local resolution


def resolve_local(ref: ModelRef | str, base_dir: Optional[Path] = None) -> Path:
    """Absolute path of the model file; raises ModelRefError when it does not exist."""
    ref = parse_model_ref(ref) if isinstance(ref, str) else ref
    if not ref.is_local:
        raise ModelRefError(f"model ref {ref.raw!r} needs fetching; provision it into the catalog first")
    if ref.scheme == "pkg":
        package, _, filename = ref.target.partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelRefError(f"model ref {ref.raw!r}: package '{package}' is not installed")
        path = Path(list(spec.submodule_search_locations)[0]) / filename
    else:
        path = Path(ref.target)
        if not path.is_absolute():
            base = (base_dir or Path.cwd()).resolve()
            path = (base / path).resolve()
            if base not in path.parents and path != base:
                raise ModelRefError(f"model ref {ref.raw!r} leaves its base directory {base}")
    if not path.is_file():
        raise ModelRefError(f"model ref {ref.raw!r}: no file at {path}")
    return path


def resolve_local_path(ref: ModelRef | str, base_dir: Optional[Path] = None) -> Path:
    """Like ``resolve_local`` but a directory (an HF checkpoint) is accepted too."""
    ref = parse_model_ref(ref) if isinstance(ref, str) else ref
    if ref.scheme == "file":
        path = Path(ref.target)
        if not path.is_absolute():
            base = (base_dir or Path.cwd()).resolve()
            path = (base / path).resolve()
            if base not in path.parents and path != base:
                raise ModelRefError(f"model ref {ref.raw!r} leaves its base directory {base}")
        if path.is_dir():
            return path
    return resolve_local(ref, base_dir)


def display_name(ref: str) -> str:
    """Short, stable name for a model ref (used in /v1/models and logs)."""
    try:
        parsed = parse_ref(ref)
    except ModelRefError:
        parsed = None
    if parsed is not None and parsed.scheme == "hf":
        tail = parsed.path.rsplit("/", 1)[-1] if parsed.path else (parsed.repo or "").rsplit("/", 1)[-1]
        return os.path.splitext(tail)[0] if tail.endswith(".gguf") else tail
    if parsed is not None and parsed.scheme in ("https", "http", "s3"):
        ref = parsed.path or ref
    elif parsed is not None and parsed.scheme == "oci":
        sep = "@" if (parsed.revision or "").startswith("sha256:") else ":"
        return f"{(parsed.repo or '').rsplit('/', 1)[-1]}{sep}{parsed.revision}"
    tail = ref.rstrip("/").rsplit("/", 1)[-1]
    tail = tail.split(":", 1)[-1] if tail.startswith(("pkg:", "file:")) else tail
    return os.path.splitext(tail)[0] if tail.endswith(".gguf") else tail


def default_model_id(ref: str) -> str:
    """A catalog id derived from a ref's display name (letters, digits, ``._:-``; 1-128)."""
    name = re.sub(r"[^A-Za-z0-9._:-]", "-", display_name(ref)).lstrip("._:-")[:128]
    return name or "model-" + hashlib.sha256(ref.encode()).hexdigest()[:12]


__all__ = [
    "ACCEPTED_FORMS", "FETCH_SCHEMES", "LOCAL_FORMS", "LOCAL_SCHEMES", "ModelRef", "ModelRefError",
    "cache_path", "cache_segments", "canonical_ref", "catalog_ref", "default_model_id", "display_name", "ensure_under", "format_ref",
    "parse_model_ref", "parse_ref", "resolve_local", "resolve_local_path", "safe_join",
]
