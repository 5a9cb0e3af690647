"""Server-Sent Events framing: one frame per event, its index as the ``id``."""

from __future__ import annotations

import json
from typing import Any, Iterable

KEEPALIVE = ": keepalive\n\n"
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def frame(index: int, kind: str, data: dict[str, Any]) -> str:
    return f"id: {index}\nevent: {kind}\ndata: {_dumps(data)}\n\n"


def frames(events: Iterable[tuple[int, str, dict[str, Any]]]) -> str:
    return "".join(frame(index, kind, data) for index, kind, data in events)
