"""Handoffs as files: an engine started outside the orchestrator (a llama-server, a vLLM
server, any OpenAI-compatible endpoint) or a model placed on disk by hand is announced by
dropping a JSON file into the watched handoff directory (``catalog.handoff_dir``, by default
``.runtime/engines/``). The pool supervisor scans it every round: a new or changed file is
stored in the catalog as a handoff record (``origin: file:<name>``), a removed file removes
its record, and an invalid file is reported in the log and ignored. Plain Python, no Ray.

File format: one JSON object per ``<name>.json`` (UTF-8, at most 64 KiB), with the fields of
a handoff record (orch/api/catalog.py ``HandoffRecord``)::

    {
      "engine": "external",                  required: the engine's name
      "mode": "external",                    how it was provisioned (external, package, container, binary, source)
      "url": "http://127.0.0.1:8081/v1",     external: the OpenAI-compatible server's base URL
      "engine_version": "b4500",
      "binary_path": "/opt/llama/llama-server",
      "model_ref": "hf:org/repo/model.gguf", the model it serves: pools configured with it bind to it
      "model_path": "/models/model.gguf",    the model file, when it is on this node's disk
      "model_digest": "sha256:<64 hex>",
      "pool_id": "default",                  bind exactly this pool, whatever its model ref
      "api_key_env": "UPSTREAM_KEY"          the variable holding the server's key (never the key)
    }

``model_path`` and ``binary_path`` must lie under ``catalog.local_roots`` (or the engine
cache, for a binary), symlinks resolved; a file naming anything else is refused.
``id`` defaults to the file name without ``.json``; ``origin`` and the timestamps are set by
the watcher. Files whose names start with ``.`` (editors' and atomic writers' temporary files)
are skipped, so write a file elsewhere and rename it in.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from pydantic import ValidationError

from orch.api.catalog import HandoffRecord
from orch.api.tasks import ID_PATTERN
from orch.core.local_roots import OutsideLocalRoots, within_roots

MAX_FILES = 256
MAX_FILE_BYTES = 64 * 1024
ORIGIN_PREFIX = "file:"
_SERVER_FIELDS = ("origin", "created_at", "updated_at")
_ID = re.compile(ID_PATTERN)


class HandoffFileError(ValueError):
    """A handoff file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class HandoffFile:
    name: str
    path: Path
    #: (modification time in ns, size): a change means the file must be read again.
    stamp: tuple[int, int]


def origin_of(name: str) -> str:
    return ORIGIN_PREFIX + name


def list_files(directory: Path | str) -> list[HandoffFile]:
    """The ``*.json`` files of the directory (at most MAX_FILES, by name); none when it is absent."""
    folder = Path(directory)
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for entry in entries:
        if not entry.name.endswith(".json") or entry.name.startswith("."):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        found.append(HandoffFile(entry.name, Path(entry.path), (info.st_mtime_ns, info.st_size)))
        if len(found) >= MAX_FILES:
            break
    return found


def check_paths(record: dict[str, Any], roots: Sequence[str]) -> None:
    """Refuse (OutsideLocalRoots) a record whose ``model_path`` or ``binary_path`` resolves
    outside ``roots``."""
    for name, what in (("model_path", "model_path"), ("binary_path", "engine binary_path")):
        if isinstance(record.get(name), str):
            within_roots(record[name], roots, what)


def read_file(handoff: HandoffFile, canonical_ref: Optional[Any] = None,
              roots: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """The handoff record a file describes, validated; raises HandoffFileError.

    ``canonical_ref`` maps the file's ``model_ref`` to the catalog's form of it; ``roots``
    are where its ``model_path`` and ``binary_path`` may lie (see ``check_paths``).
    """
    where = f"handoff file {handoff.path}"
    if handoff.stamp[1] > MAX_FILE_BYTES:
        raise HandoffFileError(f"{where} is {handoff.stamp[1]} bytes; at most {MAX_FILE_BYTES} are read")
    try:
        raw = handoff.path.read_bytes()[:MAX_FILE_BYTES + 1]
        data = json.loads(raw.decode("utf-8"))
    except OSError as exc:
        raise HandoffFileError(f"{where} cannot be read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise HandoffFileError(f"{where} is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(data, dict):
        raise HandoffFileError(f"{where} must hold one JSON object")
    reserved = [name for name in _SERVER_FIELDS if name in data]
    if reserved:
        raise HandoffFileError(f"{where}: {', '.join(reserved)} are set by the watcher, not by the file")
    stem = handoff.name[: -len(".json")]
    data.setdefault("id", stem)
    if not isinstance(data["id"], str) or not _ID.match(data["id"]):
        raise HandoffFileError(f"{where}: id {str(data['id'])[:80]!r} (default: the file name) must be 1-128 "
                               "letters, digits and . _ : - starting with a letter or digit")
    if canonical_ref is not None and isinstance(data.get("model_ref"), str):
        try:
            data["model_ref"] = canonical_ref(data["model_ref"])
        except ValueError as exc:
            raise HandoffFileError(f"{where}: model_ref: {exc}") from None
    data["origin"] = origin_of(handoff.name)
    try:
        record = HandoffRecord.model_validate(data).model_dump(mode="json", exclude={"created_at", "updated_at"})
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(part) for part in first["loc"]) or "(top level)"
        message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
        raise HandoffFileError(f"{where}: {loc}: {message}") from None
    if roots is not None:
        try:
            check_paths(record, roots)
        except OutsideLocalRoots as exc:
            raise HandoffFileError(f"{where}: {exc}") from None
    return record
