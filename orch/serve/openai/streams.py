"""A task's events as an OpenAI answer: relayed as stream chunks (one hop per batch of
events, one ``data:`` chunk per token, ``data: [DONE]`` last) or collected into one
answer. A client that goes away mid-stream has its task cancelled, so its slot is freed;
an ``error`` event during the stream becomes an error chunk followed by ``[DONE]``."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional, Union

from orch.api.errors import ErrorCode
from orch.api.events import EventKind, SSEEnd
from orch.api.openai import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    Completion,
    CompletionChoice,
    Usage,
)
from orch.api.pools import TaskEvent
from orch.core.errors import OrchError
from orch.serve import sse
from orch.serve.openai.errors import error_body
from orch.serve.service import TaskService, TaskStream

log = logging.getLogger("orch.ingress")

#: Cancels started for streams whose client went away (kept so they are not collected).
_abandoned: set[asyncio.Task] = set()


def abandon(service: TaskService, task_id: str) -> None:
    """Cancel a task whose client went away, without waiting for it."""

    async def cancel() -> None:
        try:
            await service.cancel(task_id)
        except OrchError:
            pass  # already gone
        except Exception:
            log.exception("cancelling abandoned task %s failed", task_id)

    try:
        task = asyncio.get_running_loop().create_task(cancel())
    except RuntimeError:
        return
    _abandoned.add(task)
    task.add_done_callback(_abandoned.discard)


def split(batch: list[TaskEvent]) -> tuple[list[str], Optional[tuple[str, dict[str, Any]]]]:
    """The batch's token texts, and its terminal event (``end`` or ``error``) if it has one."""
    texts = []
    for _, kind, data in batch:
        if kind == EventKind.token.value:
            texts.append(data["t"])
        elif kind in (EventKind.end.value, EventKind.error.value):
            return texts, (kind, data)
    return texts, None


def pool_error(data: dict[str, Any]) -> OrchError:
    """The exception an ``error`` event stands for."""
    try:
        return OrchError.from_dict(data)
    except (KeyError, ValueError):
        return OrchError(ErrorCode.INTERNAL, str(data.get("message", "the task failed")))


@dataclass(frozen=True)
class Collected:
    text: str
    tokens: int
    end: SSEEnd


async def collect(service: TaskService, stream: TaskStream) -> Collected:
    """The whole generation; an ``error`` event is raised."""
    finished = False
    texts: list[str] = []
    try:
        async for batch in stream.batches():
            pieces, terminal = split(batch)
            texts += pieces
            if terminal is not None:
                finished = True
                kind, data = terminal
                if kind == EventKind.error.value:
                    raise pool_error(data)
                return Collected("".join(texts), len(texts), SSEEnd.model_validate(data))
        finished = True
        raise OrchError(ErrorCode.INTERNAL, f"the stream of task {stream.task_id} ended without an end event")
    finally:
        if not finished:
            abandon(service, stream.task_id)


@dataclass(frozen=True)
class Generation:
    """What every chunk of one completion or chat answer says about its task."""

    id: str
    created: int
    model: str
    fingerprint: Optional[str]
    prompt_tokens: int
    include_usage: bool = False
    correlation: Optional[str] = None

    def usage(self, completion_tokens: int) -> Usage:
        return Usage.of(self.prompt_tokens, completion_tokens)


class CompletionChunks:
    """``text_completion`` chunks; an echoed prompt is the first one."""

    def __init__(self, gen: Generation, prefix: str = "") -> None:
        self.gen = gen
        self.prefix = prefix
        self._exclude = None if gen.include_usage else {"usage"}

    def _chunk(self, choices: list[CompletionChoice], usage: Optional[Usage] = None) -> str:
        chunk = Completion(id=self.gen.id, created=self.gen.created, model=self.gen.model,
                           system_fingerprint=self.gen.fingerprint, choices=choices, usage=usage)
        return sse.data(chunk.model_dump_json(exclude=self._exclude))

    def opening(self) -> str:
        return self.text(self.prefix) if self.prefix else ""

    def text(self, text: str) -> str:
        return self._chunk([CompletionChoice(text=text)])

    def closing(self, finish_reason: str, completion_tokens: int) -> str:
        out = self._chunk([CompletionChoice(text="", finish_reason=finish_reason)])
        if self.gen.include_usage:
            out += self._chunk([], self.gen.usage(completion_tokens))
        return out


class ChatChunks:
    """``chat.completion.chunk`` chunks: the role first, then content, then the finish."""

    def __init__(self, gen: Generation) -> None:
        self.gen = gen
        self._exclude = None if gen.include_usage else {"usage"}

    def _chunk(self, choices: list[ChatChunkChoice], usage: Optional[Usage] = None) -> str:
        chunk = ChatCompletionChunk(id=self.gen.id, created=self.gen.created, model=self.gen.model,
                                    system_fingerprint=self.gen.fingerprint, choices=choices, usage=usage)
        return sse.data(chunk.model_dump_json(exclude=self._exclude))

    def opening(self) -> str:
        return self._chunk([ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])

    def text(self, text: str) -> str:
        return self._chunk([ChatChunkChoice(delta=ChatDelta(content=text))])

    def closing(self, finish_reason: str, completion_tokens: int) -> str:
        out = self._chunk([ChatChunkChoice(delta=ChatDelta(), finish_reason=finish_reason)])
        if self.gen.include_usage:
            out += self._chunk([], self.gen.usage(completion_tokens))
        return out


Chunks = Union[CompletionChunks, ChatChunks]


def error_chunk(error: OrchError, correlation: Optional[str]) -> str:
    return sse.data(error_body(error, correlation).model_dump_json())


async def relay(service: TaskService, stream: TaskStream, chunks: Chunks) -> AsyncIterator[str]:
    """OpenAI stream chunks for one task; cancels the task if the client goes away."""
    correlation = chunks.gen.correlation
    finished = False
    tokens = 0
    try:
        opening = chunks.opening()
        if opening:
            yield opening
        async for batch in stream.batches():
            if not batch:
                yield sse.KEEPALIVE
                continue
            texts, terminal = split(batch)
            tokens += len(texts)
            out = "".join(chunks.text(text) for text in texts)
            if terminal is not None:
                finished = True
                kind, data = terminal
                if kind == EventKind.error.value:
                    out += error_chunk(pool_error(data), correlation)
                else:
                    out += chunks.closing(SSEEnd.model_validate(data).finish_reason.value, tokens)
                yield out + sse.DONE
                return
            if out:
                yield out
        finished = True
        ended = OrchError(ErrorCode.INTERNAL, "the stream ended without an end event")
        yield error_chunk(ended, correlation) + sse.DONE
    except Exception as exc:  # after the headers went out, errors can only travel as chunks
        finished = True
        log.exception("stream of task %s failed", stream.task_id)
        error = exc if isinstance(exc, OrchError) else OrchError(ErrorCode.INTERNAL, "the stream failed; the "
                                                                 "correlation id identifies it in the logs")
        yield error_chunk(error, correlation) + sse.DONE
    finally:
        if not finished:
            abandon(service, stream.task_id)
