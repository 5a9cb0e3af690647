"""Model files on disk: their sha256 (of a file, or of a manifest of a directory), what their
headers say (GGUF, or an HF checkpoint's ``config.json``), and the removal of what the catalog
fetched into the model cache. Plain Python."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

from orch.core.model_ref import ModelRefError, ensure_under
from orch.provision.errors import BadModelFile, FetchFailed, SourceNotFound
from orch.provision.gguf import is_gguf, read_gguf
from orch.provision.settings import CHUNK_BYTES, Report

MAX_MANIFEST_FILES = 100_000


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
