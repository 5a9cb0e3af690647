"""The operator's status page (``/ui``), the recent-tasks JSON it polls (``GET /v2/tasks``)
and the points of its live charts (``GET /v2/ui/series``).

The page is one HTML file with its CSS and JS inline, shipped in the package: no build step
and nothing fetched from elsewhere. It calls the API with relative URLs only, so it works
under any Serve route prefix.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from orch.observability.series import HISTORY_S
from orch.serve.http import invalid
from orch.serve.recent import TaskBook
from orch.serve.routing import ApiRoute
from orch.serve.state import IngressState

PAGE_FILE = Path(__file__).resolve().parents[1] / "static" / "status.html"
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
#: A pool that does not list its tasks within this long is reported, not waited for.
POOL_ANSWER_TIMEOUT_S = 5.0


class TaskState(str, Enum):
    queued = "queued"
    running = "running"
    ended = "ended"
    error = "error"
    cancelled = "cancelled"
    #: Queued or running when its pool stopped listing it: the pool restarted (or lost its
    #: engine) and the task's record went with it.
    lost = "lost"


class TaskSummary(BaseModel):
    task_id: str
    pool_id: str
    state: TaskState
    priority: str
    tokens_out: int = Field(ge=0)
    queue_position: Optional[int] = Field(default=None, ge=0, description="tasks ahead while queued; none otherwise")
    age_ms: int = Field(ge=0, description="time since admission")


class SeriesPoints(BaseModel):
    """One pool's points, oldest first, one per second that had any."""

    ago_s: list[int]
    tokens_per_s: list[int] = Field(description="tokens this ingress replica relayed in that second")
    ttft_ms: list[Optional[float]] = Field(description="mean first-token time of the requests this replica served "
                                           "whose first token came in that second (orchestrator + queue + engine)")
    queue_depth: list[Optional[int]] = Field(description="queue depth in the last view read that second")


class LiveSeriesAnswer(BaseModel):
    """The last minutes per pool as this ingress replica saw them (the status page's charts)."""

    now: int
    seconds: int
    pools: dict[str, SeriesPoints]


class RecentTasks(BaseModel):
    """Recent tasks of every pool, newest first; ids, state and progress only, never prompt text."""

    tasks: list[TaskSummary]
    unreachable_pools: list[str] = Field(default_factory=list,
                                         description="pools that did not answer; their tasks are missing from the list")


def routes(state: IngressState) -> list[ApiRoute]:
    registry = state.registry
    pool_ids = [pool.id for pool in state.config.pools]
    book = TaskBook()
    page, security_policy = _load_page()

    async def tasks_of(pool_id: str, limit: int) -> list[dict[str, Any]]:
        return await registry.pools.call(pool_id, "recent_tasks", limit, timeout=POOL_ANSWER_TIMEOUT_S, retry=True)

    async def recent_tasks(request: Request) -> Response:
        """Each pool's newest tasks, merged into what this replica remembers, so tasks outlive
        a restart of their pool (orch/serve/recent.py)."""
        limit = _limit(request)
        answers = await asyncio.gather(*(tasks_of(pid, limit) for pid in pool_ids), return_exceptions=True)
        unreachable = []
        for pool_id, answer in zip(pool_ids, answers):
            if isinstance(answer, BaseException):
                unreachable.append(pool_id)
            else:
                book.answered(pool_id, answer, limit)
        rows = book.newest(limit)
        body = RecentTasks(tasks=[TaskSummary.model_validate(row) for row in rows], unreachable_pools=unreachable)
        return JSONResponse(body.model_dump(mode="json"))

    async def live_series(request: Request) -> Response:
        seconds = _bounded(request, "seconds", 1, HISTORY_S, HISTORY_S)
        return JSONResponse(LiveSeriesAnswer.model_validate(state.series.read(seconds)).model_dump(mode="json"))

    async def status_page(request: Request) -> Response:
        return HTMLResponse(page, headers={
            "Cache-Control": "no-cache",
            "Content-Security-Policy": security_policy,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        })

    async def to_status_page(request: Request) -> Response:
        return RedirectResponse(request.scope.get("root_path", "").rstrip("/") + "/ui", status_code=307)

    return [
        ApiRoute("GET", "/v2/tasks", recent_tasks, "Recent tasks of every pool, newest first (no prompt text)", "tasks",
                 answers={200: RecentTasks}, query={"limit": f"most tasks listed, 1-{MAX_LIMIT} (default {DEFAULT_LIMIT})"},
                 errors=(400, 401), scope="admin"),
        ApiRoute("GET", "/v2/ui/series", live_series, "The last minutes per pool as this ingress replica saw them: "
                 "tokens/s, first-token time, queue depth (the status page's charts)", "operations",
                 answers={200: LiveSeriesAnswer}, query={"seconds": f"history wanted, 1-{HISTORY_S} (default {HISTORY_S})"},
                 errors=(400, 401), scope="admin"),
        ApiRoute("GET", "/ui", status_page, "Status page: pools and recent tasks", "operations",
                 answers={200: ("text/html", "the status page")}, errors=(401,), include_in_schema=False, scope=None),
        ApiRoute("GET", "/", to_status_page, "Redirect to the status page", "operations",
                 answers={307: None}, errors=(), include_in_schema=False, scope=None),
    ]


def _limit(request: Request) -> int:
    return _bounded(request, "limit", 1, MAX_LIMIT, DEFAULT_LIMIT)


def _bounded(request: Request, name: str, low: int, high: int, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9 or not low <= int(raw) <= high:
        raise invalid(f"{name} must be a whole number from {low} to {high}")
    return int(raw)


def _load_page() -> tuple[str, str]:
    """The page and a content security policy that allows exactly its own inline script and
    style and calls to this origin, so nothing injected into it could run or load."""
    page = PAGE_FILE.read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in bodies)

    policy = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
              "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return page, policy
