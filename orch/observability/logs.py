"""Logs operators can tail: JSON lines by default, a readable console mode on request.

Every line carries the context fields that apply (correlation_id, task_id, session_id,
pool_id, engine); key moments (admission, placement, stream start, stream end, cancel)
also carry ``human``, one plain sentence without opaque ids. Context comes from
``contextvars`` in the ingress (set per request) and from ``extra=`` where a pool logs
about one task. ``ORCH_LOG_FORMAT=pretty`` switches to the console mode.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import time
from typing import Any, Optional

CONTEXT_FIELDS = ("correlation_id", "task_id", "session_id", "pool_id", "engine", "identity", "user")
_context: dict[str, contextvars.ContextVar[Optional[str]]] = {
    name: contextvars.ContextVar(f"orch_log_{name}", default=None) for name in CONTEXT_FIELDS
}
_configured = False


def bind(**fields: Optional[str]) -> None:
    """Set context fields for the rest of this request (asyncio task)."""
    for name, value in fields.items():
        if name in _context and value is not None:
            _context[name].set(value)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in CONTEXT_FIELDS:
        value = getattr(record, name, None) or _context[name].get()
        if value is not None:
            out[name] = value
    human = getattr(record, "human", None)
    if human:
        out["human"] = human
    return out


class JsonLinesFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(_fields(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class PrettyFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(record)
        human = fields.pop("human", None)
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        context = " ".join(f"{k}={v}" for k, v in fields.items())
        text = human or record.getMessage()
        line = f"{stamp} {record.levelname:<7} {record.name:<14} {text}" + (f"  [{context}]" if context else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(mode: Optional[str] = None, level: int = logging.INFO) -> None:
    """Route the ``orch`` loggers to stderr in the chosen format (idempotent per process)."""
    global _configured
    mode = (mode or os.environ.get("ORCH_LOG_FORMAT", "json")).lower()
    root = logging.getLogger("orch")
    if _configured:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PrettyFormatter() if mode == "pretty" else JsonLinesFormatter())
    root.handlers = [handler]
    root.setLevel(level)
    root.propagate = False
    _configured = True
