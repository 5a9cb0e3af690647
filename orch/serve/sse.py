"""Server-Sent Events framing: the v2 streams' frames (one per event, its index as the
``id``) and the OpenAI streams' bare ``data:`` lines."""

from __future__ import annotations

import json
from typing import Any, Iterable

KEEPALIVE = ": keepalive\n\n"
#: What an OpenAI stream sends while it waits: a blank line, which an SSE parser ignores (no
#: event to dispatch). Not a comment: OpenAI-compatible clients in use (vLLM's benchmark
#: client among them) strip each network read and split messages on blank lines, so a
#: comment read on its own loses its separator and glues itself to every message after it.
OPENAI_KEEPALIVE = "\n"
#: The last line of an OpenAI stream.
DONE = "data: [DONE]\n\n"
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def frame(index: int, kind: str, data: dict[str, Any]) -> str:
    return f"id: {index}\nevent: {kind}\ndata: {_dumps(data)}\n\n"


def frames(events: Iterable[tuple[int, str, dict[str, Any]]]) -> str:
    return "".join(frame(index, kind, data) for index, kind, data in events)


def data(text: str) -> str:
    """One ``data:`` line holding ``text`` (JSON already)."""
    return f"data: {text}\n\n"
