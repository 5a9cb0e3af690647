"""The orchestrator's HTTP API as the CLI sees it: one-line errors and a status line."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence, TextIO

import httpx

from orch.api import sse_client

EXIT_FAILED = 2
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A failure worth one line to the user; ``main`` prints it and exits 2."""


class ApiError(CliError):
    """The orchestrator answered with an error; keeps its ``code`` for callers that branch on it."""

    def __init__(self, response: httpx.Response) -> None:
        self.status = response.status_code
        self.code, self.message = _error_of(response)
        super().__init__(f"the orchestrator answered {self.status} {self.code}: {self.message}")


def _error_of(response: httpx.Response) -> tuple[str, str]:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP_{response.status_code}", response.text.strip()[:300] or response.reason_phrase
    if isinstance(body, dict) and isinstance(body.get("error"), dict):  # the OpenAI-compatible envelope
        body = body["error"]
    if isinstance(body, dict) and "message" in body:
        return str(body.get("code") or f"HTTP_{response.status_code}"), str(body["message"])
    return f"HTTP_{response.status_code}", json.dumps(body)[:300]


def unreachable_message(url: str, exc: Exception) -> str:
    reason = str(exc) or type(exc).__name__
    if "refused" in reason.lower():
        reason = "connection refused"
    return f"cannot reach the orchestrator at {url}: {reason}; is it running? start it with: orch up"


class Api:
    """The orchestrator's HTTP API with the CLI's error handling: transport failures and
    error answers become one-line ``CliError``s."""

    def __init__(self, url: str, token: Optional[str], timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = httpx.Timeout(timeout_s, connect=5.0)
        self.client = httpx.Client(base_url=self.url, headers=self.headers, timeout=self.timeout)

    def close(self) -> None:
        self.client.close()

    def request(self, method: str, path: str, *, ok: Sequence[int] = (200,), **kwargs: Any) -> httpx.Response:
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise CliError(f"the orchestrator at {self.url} did not answer {method} {path} in time") from None
        except httpx.TransportError as exc:
            raise CliError(unreachable_message(self.url, exc)) from None
        if response.status_code not in ok:
            raise ApiError(response)
        return response

    def get_json(self, path: str, ok: Sequence[int] = (200,)) -> Any:
        return self.request("GET", path, ok=ok).json()

    @contextmanager
    def stream_events(self, task_id: str) -> Iterator[Iterator[tuple[str, dict[str, Any]]]]:
        """A task's SSE events as (event, data) pairs; keepalives are skipped."""
        path = f"/v2/tasks/{task_id}/events"
        try:
            with self.client.stream("GET", path, timeout=httpx.Timeout(60.0, connect=5.0)) as response:
                if response.status_code != 200:
                    response.read()
                    raise ApiError(response)
                yield sse_client.events(response.iter_lines())
        except httpx.TimeoutException:
            raise CliError(f"the stream of task {task_id} went quiet for 60 s; the orchestrator may be overloaded") from None
        except httpx.TransportError as exc:
            raise CliError(unreachable_message(self.url, exc)) from None


class Progress:
    """One status line on stderr: rewritten in place on a terminal, a line per change elsewhere."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self.shown = ""
        self.lock = threading.Lock()

    def show(self, text: str) -> None:
        with self.lock:
            if text == self.shown:
                return
            self.shown = text
            if self.live:
                self.stream.write("\r\x1b[K" + text)
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    def clear(self) -> None:
        with self.lock:
            if self.live and self.shown:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
            self.shown = ""
