"""What happens as a task ends: its transcript, its log line, the finish listeners (artifact
store, sessions), and forgetting finished tasks after ``retain_finished_s``."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Optional

from orch.api.events import SSEEnd, SSEError
from orch.artifacts.transcript import build_transcript
from orch.pools.core import PoolCore
from orch.pools.frames import Frames
from orch.pools.loops import call_on
from orch.pools.task_record import TaskRecord

log = logging.getLogger("orch.pool")

#: Finished tasks kept at most, whatever their age.
MAX_FINISHED_RECORDS = 10_000

#: The models of the terminal events, which name the task's transcript.
_TERMINAL_EVENTS: dict[str, type[SSEEnd | SSEError]] = {"end": SSEEnd, "error": SSEError}

#: Receives one summary per finished task: its transcript artifact and its usage.
FinishListener = Callable[[dict[str, Any]], Awaitable[None]]


class Finisher:
    def __init__(self, core: PoolCore, frames: Frames) -> None:
        self.core = core
        self.frames = frames
        self.listeners: list[FinishListener] = []
        self.finished: Optional[asyncio.Queue] = None
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        """Listeners and the janitor run from the pool's start, so tasks that end while the
        pool waits for its model (cancelled, refused) leave transcripts too."""
        if not self._tasks:
            self.finished = asyncio.Queue()
            self._tasks = [asyncio.create_task(self._deliver()), asyncio.create_task(self._sweep())]

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()

    def finalize(self, record: TaskRecord, kind: str, data: dict[str, Any]) -> dict[str, Any]:
        """Build the task's transcript as it ends and name it in the terminal event.

        Runs under the record's lock, from whichever thread ends the task, so it only
        computes; delivery to the listeners (artifact store, sessions) happens on the loop.
        """
        core = self.core
        engine = core.engine
        decode_ms = core.decode_ms(record)
        transcript_id, body = build_transcript(
            task_id=record.task_id, pool_id=core.pool_id, engine=core.engine_name,
            engine_version=engine.version if engine else "", model_ref=core.model_ref, model_digest=core.model_digest,
            request=record.request, seed=record.params.seed if record.inputs is None else None,
            tokens_in=record.prompt_tokens, tokens_out=record.tokens_out, decode_time_ms=decode_ms,
            queue_wait_ms=int((record.started_at - record.admitted_at) * 1000) if record.started_at else None,
            events=[(k, d) for k, d in record.events] + [(kind, _without_vectors(data))],
            session_id=record.session_id, correlation_id=record.correlation_id,
        )
        core.metrics.finished.inc("end" if kind == "end" else str(data.get("code", "error")))
        log.info("%s", kind, extra=core.log_context(record, human=self.frames.ending(record, kind, data)))
        core.metrics.tokens.inc("in", record.prompt_tokens)
        core.metrics.tokens.inc("out", record.tokens_out)
        if record.started_at is not None:
            core.metrics.decoded(record.priority, decode_ms)
        self._hand_over({
            "task_id": record.task_id, "pool_id": core.pool_id, "session_id": record.session_id,
            "key_id": record.context.key_id,
            "outcome": kind, "error_code": data.get("code") if kind == "error" else None,
            "tokens_in": record.prompt_tokens, "tokens_out": record.tokens_out, "decode_time_ms": decode_ms,
            "transcript_id": transcript_id, "transcript": body,
        })
        return _TERMINAL_EVENTS[kind].model_validate(data).model_copy(update={"transcript_id": transcript_id}).payload()

    def _hand_over(self, summary: dict[str, Any]) -> None:
        loop = self.core.loop
        if self.finished is None or loop is None:
            return
        call_on(loop, self.finished.put_nowait, summary)

    async def _deliver(self) -> None:
        assert self.finished is not None
        while True:
            summary = await self.finished.get()
            for listener in list(self.listeners):
                try:
                    await listener(summary)
                except Exception:  # a listener must never stop the others or the pool
                    log.exception("pool %s: finish listener failed for task %s", self.core.pool_id, summary["task_id"])

    async def _sweep(self) -> None:
        retain = self.core.config.retain_finished_s
        while True:
            await asyncio.sleep(min(retain / 4, 30))
            self.sweep_once(time.monotonic(), retain)

    def sweep_once(self, now: float, retain: float) -> None:
        """One sweep, in its own frame so no list of swept records outlives it."""
        tasks = self.core.tasks
        finished = [r for r in tasks.values() if r.finished_at is not None]
        expired = {r.task_id for r in finished if now - r.finished_at > retain}
        overflow = len(finished) - len(expired) - MAX_FINISHED_RECORDS
        if overflow > 0:
            rest = sorted((r for r in finished if r.task_id not in expired), key=lambda r: r.finished_at)
            expired.update(r.task_id for r in rest[:overflow])
        for task_id in expired:
            tasks.pop(task_id, None)


def _without_vectors(data: dict[str, Any]) -> dict[str, Any]:
    """Transcripts record that vectors were returned, not the vectors themselves."""
    vectors = data.get("embeddings")
    if not vectors:
        return data
    return {k: v for k, v in data.items() if k != "embeddings"} | {
        "embeddings_returned": len(vectors), "embedding_dim": len(vectors[0])}

