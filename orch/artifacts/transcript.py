"""The transcript every task leaves behind, built from its record when it ends.

It holds what is needed to understand or replay the task without its input: the request
parameters with the prompt (and embedding inputs) redacted, seed, engine and version,
model ref and digest when known, the counts and timings, the SSE event sequence, and the
error when there was one.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional

from orch.artifacts.store import ArtifactKind, artifact_body, artifact_id


def redacted(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    return f"<redacted: {len(text)} chars, sha256 {digest}>"


def build_transcript(
    *,
    task_id: str,
    pool_id: str,
    engine: str,
    engine_version: str,
    model_ref: str,
    model_digest: Optional[str],
    request: dict[str, Any],
    seed: Optional[int],
    tokens_in: int,
    tokens_out: int,
    decode_time_ms: int,
    queue_wait_ms: Optional[int],
    events: list[tuple[str, dict[str, Any]]],
    session_id: Optional[str],
    correlation_id: Optional[str],
) -> tuple[str, dict[str, Any]]:
    """Returns (artifact id, artifact body). The terminal event is the last of ``events``."""
    request = dict(request)
    if "prompt" in request and request["prompt"] is not None:
        request["prompt"] = redacted(request["prompt"])
    if request.get("inputs"):
        request["inputs"] = [redacted(text) for text in request["inputs"]]
    last_kind, last_data = events[-1] if events else ("", {})
    content = {
        "task_id": task_id,
        "pool_id": pool_id,
        "engine": engine,
        "engine_version": engine_version,
        "model_ref": model_ref,
        "model_digest": model_digest,
        "request": request,
        "seed": seed,
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
        "decode_time_ms": decode_time_ms,
        "queue_wait_ms": queue_wait_ms,
        "outcome": last_kind,
        "error": last_data if last_kind == "error" else None,
        "events": [{"id": index, "event": kind, "data": data} for index, (kind, data) in enumerate(events)],
    }
    tags = [f"task:{task_id}", f"pool:{pool_id}", f"outcome:{last_kind}"]
    metadata: dict[str, Any] = {"correlation_id": correlation_id} if correlation_id else {}
    if session_id:
        tags.append(f"session:{session_id}")
    body = artifact_body(ArtifactKind.transcript.value, content, tags=tags, metadata=metadata)
    return artifact_id(body), body
