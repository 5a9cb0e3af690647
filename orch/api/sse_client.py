"""Reading Server-Sent Events: the client side of ``orch.serve.sse``, for the CLI and the
benchmarks (the task event stream and the OpenAI-compatible streams alike).

Follows the EventSource rules that these streams use: fields up to a blank line make one
message, ``data`` lines join with newlines, a message without data is not delivered, lines
starting with ``:`` (keepalives) are comments, and the event name defaults to ``message``.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Union

#: The OpenAI streams' last data line.
DONE = "[DONE]"
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class SSEMessage:
    event: str
    data: str
    id: Optional[str] = None

    def payload(self) -> Any:
        """The data as JSON; ``{"done": True}`` for ``[DONE]`` and ``{"raw": data}`` when it is
        not JSON, so a reader never fails on one odd message."""
        if self.data == DONE:
            return {"done": True}
        try:
            return json.loads(self.data)
        except ValueError:
            return {"raw": self.data}


class SSEDecoder:
    """Reads a stream incrementally: ``feed`` each chunk (bytes or text) as it arrives and get
    the messages it completed; a chunk may end anywhere, even inside a UTF-8 character."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._event: Optional[str] = None
        self._id: Optional[str] = None
        self._data: list[str] = []

    def feed(self, chunk: Union[bytes, str]) -> list[SSEMessage]:
        self._pending += self._utf8.decode(chunk) if isinstance(chunk, bytes) else chunk
        held = ""
        if self._pending.endswith("\r"):  # maybe the first half of "\r\n": wait for the next chunk
            self._pending, held = self._pending[:-1], "\r"
        *lines, self._pending = _LINE_BREAK.split(self._pending)
        self._pending += held
        return [message for message in map(self.line, lines) if message is not None]

    def line(self, line: str) -> Optional[SSEMessage]:
        """One line (without its line break); the message it completes, if any."""
        if line == "":
            message = SSEMessage(self._event or "message", "\n".join(self._data), self._id) if self._data else None
            self._event, self._id, self._data = None, None, []
            return message
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id":
            self._id = value
        return None


def messages(lines: Iterable[str]) -> Iterator[SSEMessage]:
    """Messages from a stream's lines (without their line breaks), each as soon as its blank
    line arrives; an unfinished message at the end is dropped, as a browser drops it."""
    decoder = SSEDecoder()
    for line in lines:
        message = decoder.line(line)
        if message is not None:
            yield message


def parse(body: Union[bytes, str]) -> list[SSEMessage]:
    """Every message of a complete body (its last message needs no closing blank line)."""
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    return list(messages(_LINE_BREAK.split(text) + [""]))


def events(lines: Iterable[str]) -> Iterator[tuple[str, Any]]:
    """(event, payload) pairs from a stream's lines."""
    for message in messages(lines):
        yield message.event, message.payload()
