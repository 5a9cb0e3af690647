"""The ``metrics`` frames a task's stream gets while it waits and runs, and the sentences
(``?verbose=true``, the human log line) that say the same in words."""

from __future__ import annotations

import logging
from typing import Any, Optional

from orch.api.events import FinishReason, SSEMetrics
from orch.core.forecast import on_time_probability
from orch.pools.admission import predicted_start_ms
from orch.pools.core import PoolCore
from orch.pools.task_record import TaskRecord

log = logging.getLogger("orch.pool")


class Frames:
    def __init__(self, core: PoolCore) -> None:
        self.core = core

    def push(self, record: TaskRecord, now: float) -> None:
        if record.inputs is not None:  # embeddings: one step, nothing to follow
            return
        record.metrics_at = now
        try:
            frame = self.metrics(record, now).payload()
        except Exception:  # a frame is informational: never let it end a task
            log.exception("pool %s: metrics frame for %s failed", self.core.pool_id, record.task_id)
            return
        record.push("metrics", frame)

    def metrics(self, record: TaskRecord, now: float) -> SSEMetrics:
        """What a client following the task wants to know now: the queue, the chance to meet
        its deadline at the pool's measured rates, whether its session's cache is warm, its
        session's budgets left, and (for ``?verbose=true``) a sentence."""
        core = self.core
        queued = record.state == "queued"
        position = core.queue.position(record.task_id) if queued else None
        rate = core.rates.tokens_per_s
        chance = None
        if record.deadline_at is not None:
            wait_ms = predicted_start_ms(core, position) if position is not None else 0.0
            estimate = core.rates.remaining_ms(max(0, record.params.max_tokens - record.tokens_out),
                                               first_token_seen=record.tokens_out > 0, wait_ms=wait_ms)
            if estimate is not None:
                chance = on_time_probability((record.deadline_at - now) * 1000, *estimate)
        prep = core.preparation if record.task_id in core.deferred else None
        frame = SSEMetrics(queue_depth=len(core.queue), queue_position=position, on_time_probability=chance,
                           kv_warmth=record.context.kv_warmth, tokens_out=record.tokens_out,
                           tokens_per_s=round(rate, 1) if rate else None, budgets=self._budgets_left(record),
                           prep=prep)
        return frame.model_copy(update={"human": self._sentence(record, frame)})

    def _budgets_left(self, record: TaskRecord) -> Optional[dict[str, Any]]:
        """The session's budgets left at admission, less what this task has used so far."""
        budgets = record.context.budgets
        if not budgets:
            return None
        prices = record.context.prices or {}
        left: dict[str, Any] = {}
        if budgets.get("tokens") is not None:
            left["tokens"] = max(0, budgets["tokens"] - record.prompt_tokens - record.tokens_out)
        if budgets.get("time_ms") is not None:
            left["time_ms"] = max(0, budgets["time_ms"] - self.core.decode_ms(record))
        if budgets.get("cost") is not None:
            spent = (record.prompt_tokens * prices.get("in", 0.0) + record.tokens_out * prices.get("out", 0.0)) / 1000
            left["cost"] = round(max(0.0, budgets["cost"] - spent), 9)
        return left

    def _sentence(self, record: TaskRecord, frame: SSEMetrics) -> str:
        pool_id = self.core.pool_id
        if record.task_id in self.core.deferred:
            return f"Waiting for pool {pool_id} to prepare its model; the task runs once it is loaded."
        if frame.queue_position is not None:
            start = predicted_start_ms(self.core, frame.queue_position) / 1000
            said = (f"Waiting in pool {pool_id}'s queue at position {frame.queue_position + 1} of "
                    f"{frame.queue_depth}; expected to start in about {start:.1f} s.")
        else:
            rate = f" at about {frame.tokens_per_s:g} tokens/s" if frame.tokens_per_s else ""
            said = f"Generating on pool {pool_id}: {record.tokens_out} tokens so far{rate}."
        if frame.on_time_probability is not None:
            said += f" {round(frame.on_time_probability * 100)}% likely to finish before the deadline."
        if frame.budgets and frame.budgets.get("tokens") is not None:
            said += f" The session has {frame.budgets['tokens']} tokens of budget left."
        return said

    def ending(self, record: TaskRecord, kind: str, data: dict[str, Any]) -> str:
        """The log's sentence for a task's terminal event."""
        pool_id = self.core.pool_id
        if kind == "end" and data.get("finish_reason") == FinishReason.cancelled.value:
            return f"Cancelled on pool {pool_id} after {record.tokens_out} token(s)."
        if kind == "end":
            if record.inputs is not None:
                return f"Embedded {len(record.inputs)} input(s) on pool {pool_id}."
            return (f"Finished on pool {pool_id}: {record.tokens_out} token(s) in "
                    f"{self.core.decode_ms(record)} ms ({data.get('finish_reason', 'done')}).")
        return f"Failed on pool {pool_id} after {record.tokens_out} token(s): {data.get('message', 'error')}"
