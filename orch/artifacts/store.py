"""Content-addressed artifact store on disk. Plain Python, no Ray.

An artifact's id is ``sha256:<hex>`` of its canonical JSON (kind, content, tags, parent,
metadata; sorted keys, compact separators), so the same record always gets the same id and
storing it twice is a no-op. Each artifact is one JSON file under
``<root>/<first two hex digits>/<hex>.json``, written to a temporary file and renamed, so a
reader never sees half a record.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any, Optional

from orch.api.artifacts import ARTIFACT_ID_PATTERN, ArtifactKind
from orch.core.files import atomic_write

ARTIFACT_ID = re.compile(ARTIFACT_ID_PATTERN)


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def artifact_body(
    kind: str, content: Any, *, tags: Optional[list[str]] = None, parent: Optional[str] = None,
    metadata: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """The hashed part of an artifact, normalised (tags sorted and de-duplicated)."""
    return {
        "kind": ArtifactKind(kind).value,
        "content": content,
        "tags": sorted(set(tags or [])),
        "parent": parent,
        "metadata": metadata or {},
    }


def artifact_id(body: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(body)).hexdigest()


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, art_id: str) -> Path:
        if not ARTIFACT_ID.match(art_id):
            raise ValueError(f"artifact id must be 'sha256:' and 64 lowercase hex digits, got {art_id[:80]!r}")
        digest = art_id.split(":", 1)[1]
        return self.root / digest[:2] / f"{digest}.json"

    def put(self, body: dict[str, Any]) -> tuple[str, bool]:
        """Store a body made by ``artifact_body``; returns (id, created)."""
        art_id = artifact_id(body)
        path = self._path(art_id)
        if path.exists():
            return art_id, False
        record = dict(body, id=art_id, created_at=time.time())
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, canonical_json(record))
        return art_id, True

    def get(self, art_id: str) -> Optional[dict[str, Any]]:
        path = self._path(art_id)
        try:
            return json.loads(path.read_bytes())
        except FileNotFoundError:
            return None

    def exists(self, art_id: str) -> bool:
        return self._path(art_id).exists()
