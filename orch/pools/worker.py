"""The pool's slots: each takes the next task from the queue and runs it on the engine.

Engines whose ``generates_on_loop`` is set (vLLM) generate on the pool's event loop
(``generate_async``); the others (llama.cpp, the mock) generate in a thread of the pool's
executor, one per busy slot. Either way the loop stays free to move events and to answer
submit, poll and cancel while tokens are being generated.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence, Union

from orch.api.errors import ErrorCode
from orch.api.events import FinishReason, SSEEnd, SSEStarted
from orch.engines.base import EngineError, Piece, TokenLogprob
from orch.pools.core import RETRY_AFTER_MS, PoolCore
from orch.pools.frames import Frames
from orch.pools.task_record import TaskRecord

log = logging.getLogger("orch.pool")

#: A running task gets a ``metrics`` frame when it starts and then at most this often.
METRICS_EVERY_S = 1.0


class Slots:
    def __init__(self, core: PoolCore, frames: Frames) -> None:
        self.core = core
        self.frames = frames

    async def worker(self) -> None:
        core = self.core
        while True:
            await core.dispatch_open.wait()  # closed while the engine is swapped
            item = core.queue.pop()
            if item is None:
                core.work.clear()
                await core.work.wait()
                continue
            await self._hold(item[1], core.free_slots)

    async def reserve_worker(self) -> None:
        """One reserve slot: while every regular slot is busy, it runs the next task of a
        tenant that has nothing running here, so that tenant never waits behind another's
        backlog for a slot to free. An idle regular slot takes the work first."""
        core = self.core
        while True:
            await core.dispatch_open.wait()
            core.reserve_work.clear()
            item = core.queue.pop_idle(core.running_tenants) if not core.free_slots else None
            if item is None:
                await core.reserve_work.wait()
                continue
            await self._hold(item[1], core.free_reserve)

    async def _hold(self, record: TaskRecord, free: list[int]) -> None:
        """Run ``record`` on a slot taken from ``free`` and hand the slot back."""
        core = self.core
        slot = free.pop()
        tenant = record.context.tenant
        core.active_slots += 1
        core.running[slot] = record
        core.running_tenants[tenant] += 1
        try:
            await self._run(record, slot)
        except Exception as exc:  # never let one task kill the slot
            log.exception("pool %s: task %s failed", core.pool_id, record.task_id)
            core.fail(record, ErrorCode.INTERNAL, f"engine failed: {exc}")
        finally:
            core.running.pop(slot, None)
            core.active_slots -= 1
            free.append(slot)
            core.running_tenants[tenant] -= 1
            if core.running_tenants[tenant] <= 0:
                del core.running_tenants[tenant]
                core.reserve_work.set()  # its queued work, if any, may take a reserve slot now

    async def _run(self, record: TaskRecord, slot: int) -> None:
        core = self.core
        if record.terminal or record.cancelled:
            return
        now = time.monotonic()
        if record.deadline_at is not None and now >= record.deadline_at:
            core.fail(record, ErrorCode.DECODE_TIMEOUT, "deadline passed while the task was queued", retriable=True)
            return
        record.state = "running"
        record.started_at = now
        core.counts.started(record.priority)
        waited = int((now - record.admitted_at) * 1000)
        log.info("started after %d ms queued", waited, extra=core.log_context(record, human=(
            f"Started on pool {core.pool_id} after waiting {waited} ms in the queue.")))
        record.push("started", self._started(record))
        if record.inputs is not None:
            await self._embed(record, slot)
        else:
            self.frames.push(record, now)
            await self._generate(record, slot, now)

    def _started(self, record: TaskRecord) -> dict[str, Any]:
        """The ``started`` event's data (embeddings have no seed)."""
        return SSEStarted(
            queue_position=record.queue_position, predicted_start_ms=record.predicted_start_ms,
            queue_wait_ms=int((record.started_at - record.admitted_at) * 1000), pool_id=self.core.pool_id,
            engine=self.core.engine_name, engine_version=self.core.engine.version,
            seed=record.params.seed if record.inputs is None else None, prompt_tokens=record.prompt_tokens,
            placement=record.context.placement,
        ).payload()

    async def _generate(self, record: TaskRecord, slot: int, now: float) -> None:
        core, engine = self.core, self.core.engine
        deadline_hit = False

        def emit(piece: Union[str, Piece]) -> bool:
            nonlocal deadline_hit
            at = time.monotonic()
            if record.deadline_at is not None and at >= record.deadline_at:
                deadline_hit = True
                return False
            if type(piece) is not str and piece.prompt:  # the prompt's logprobs: no output, no first token
                return record.push_prompt(logprob_payload(piece.logprobs))
            if record.tokens_out == 0:
                record.first_token_at = at
                core.metrics.first_token(record.priority, (at - record.admitted_at) * 1000)
            if type(piece) is str:
                pushed = record.push_token(piece)
            else:
                pushed = record.push_token(piece.text, piece.tokens,
                                           logprob_payload(piece.logprobs) if piece.logprobs else None)
            if not pushed:
                return False
            if at - (record.metrics_at or 0.0) >= METRICS_EVERY_S:
                self.frames.push(record, at)
            return True

        try:
            if engine.generates_on_loop:
                finish = await engine.generate_async(slot, record.prompt, record.params, emit)
            else:
                finish = await core.loop.run_in_executor(
                    core.executor, engine.generate, slot, record.prompt, record.params, emit)
        except EngineError as exc:
            self._engine_error(record, exc)
            return
        finally:
            elapsed_ms = (time.monotonic() - now) * 1000
            core.service_ms = 0.8 * core.service_ms + 0.2 * elapsed_ms
        if not record.cancelled and record.first_token_at is not None:
            core.rates.observe((record.first_token_at - now) * 1000, record.tokens_out, elapsed_ms)
            core.prefix.prefilled((record.first_token_at - now) * 1000, record.prompt_tokens - record.prefix_hit_tokens)
        if deadline_hit:
            core.fail(record, ErrorCode.DECODE_TIMEOUT, f"deadline passed after {record.tokens_out} tokens",
                      retriable=True)
            return
        end = SSEEnd(tokens_out=record.tokens_out, decode_time_ms=core.decode_ms(record), finish_reason=finish)
        if record.push("end", end.payload()):
            core.counts.add("completed")

    def _engine_error(self, record: TaskRecord, exc: EngineError) -> None:
        core = self.core
        if exc.fatal:
            core.fail(record, ErrorCode.WORKER_RESET, f"pool '{core.pool_id}' lost its engine ({exc}); resubmit the task",
                      retriable=True, retry_after_ms=RETRY_AFTER_MS)
            core.engine_fault(exc)
        else:
            core.fail(record, exc.code or ErrorCode.INTERNAL, str(exc))

    async def _embed(self, record: TaskRecord, slot: int) -> None:
        core = self.core
        try:
            vectors, tokens = await core.loop.run_in_executor(core.executor, core.engine.embed, slot, record.inputs)
        except EngineError as exc:
            core.fail(record, exc.code or ErrorCode.INTERNAL, str(exc))
            return
        end = SSEEnd(tokens_out=0, tokens_in=tokens, decode_time_ms=core.decode_ms(record),
                     finish_reason=FinishReason.stop, embeddings=vectors)
        if record.push("end", end.payload()):
            core.counts.add("completed")


def logprob_payload(logprobs: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """Token logprobs as a ``token`` event carries them (``orch.api.events.SSETokenLogprob``)."""
    return [{"token": lp.token, "logprob": None if lp.logprob is None else _finite(lp.logprob), "bytes": list(lp.bytes),
             "top": [{"token": text, "logprob": _finite(value)} for text, value in lp.top]} for lp in logprobs]


def _finite(logprob: float) -> float:
    """JSON has no infinity: a token that cannot occur gets OpenAI's -9999."""
    return logprob if logprob > -9999.0 else -9999.0
