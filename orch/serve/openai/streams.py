"""A request's tasks (one per choice) as an OpenAI answer: relayed as stream chunks (one hop
per batch of events, one ``data:`` chunk per token event, each naming its choice's
``index``, ``data: [DONE]`` last) or collected into one answer. A client that goes away
has every unfinished task of its request cancelled, so their slots are freed; an ``error``
event of any choice becomes an error chunk followed by ``[DONE]``, and the other choices are
cancelled."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional, Sequence, Union

import ray

from orch.actors import detached_task
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
from orch.serve.openai.logprobs import chat_logprobs, completion_logprobs
from orch.serve.service import TaskService, TaskStream

log = logging.getLogger("orch.ingress")

#: Cancels started for streams whose client went away (kept so they are not collected).
_abandoned: set[asyncio.Task] = set()


def abandon(service: TaskService, task_id: str) -> None:
    """Cancel a task whose client went away, without waiting for it."""

    async def cancel() -> None:
        for attempt in range(2):
            try:
                await service.cancel(task_id)
            except OrchError:
                pass  # already gone
            except ray.exceptions.TaskCancelledError:
                if attempt == 0:  # Ray cancelled the call itself (with the request): once more
                    continue
                log.exception("cancelling abandoned task %s failed", task_id)
            except Exception:
                log.exception("cancelling abandoned task %s failed", task_id)
            return

    try:
        task = detached_task(cancel())  # not a child of the request Serve is cancelling
    except RuntimeError:
        return
    _abandoned.add(task)
    task.add_done_callback(_abandoned.discard)


def split(batch: list[TaskEvent]) -> tuple[list[dict[str, Any]], Optional[tuple[str, dict[str, Any]]]]:
    """The batch's ``token`` events' data, and its terminal event (``end`` or ``error``) if it has one."""
    pieces = []
    for _, kind, data in batch:
        if kind == EventKind.token.value:
            pieces.append(data)
        elif kind in (EventKind.end.value, EventKind.error.value):
            return pieces, (kind, data)
    return pieces, None


def pool_error(data: dict[str, Any]) -> OrchError:
    """The exception an ``error`` event stands for."""
    try:
        return OrchError.from_dict(data)
    except (KeyError, ValueError):
        return OrchError(ErrorCode.INTERNAL, str(data.get("message", "the task failed")))


@dataclass
class Collected:
    """One choice, whole: its text, output tokens, ``end`` event and logprobs when asked."""

    text: str
    tokens: int
    end: SSEEnd
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    prompt_logprobs: Optional[list[dict[str, Any]]] = None


async def collect(service: TaskService, stream: TaskStream) -> Collected:
    """The whole generation; an ``error`` event is raised."""
    finished = False
    texts: list[str] = []
    logprobs: list[dict[str, Any]] = []
    prompt: Optional[list[dict[str, Any]]] = None
    stream.whole = True
    try:
        async for batch in stream.batches():
            pieces, terminal = split(batch)
            for piece in pieces:
                if "prompt_logprobs" in piece:
                    prompt = piece["prompt_logprobs"]
                    continue
                texts.append(piece["t"])
                if "logprobs" in piece:
                    logprobs += piece["logprobs"]
            if terminal is not None:
                finished = True
                kind, data = terminal
                if kind == EventKind.error.value:
                    raise pool_error(data)
                end = SSEEnd.model_validate(data)
                return Collected("".join(texts), end.tokens_out, end, logprobs, prompt)
        finished = True
        raise OrchError(ErrorCode.INTERNAL, f"the stream of task {stream.task_id} ended without an end event")
    finally:
        if not finished:
            abandon(service, stream.task_id)


async def collect_all(service: TaskService, streams: Sequence[TaskStream]) -> list[Collected]:
    """Every choice, collected together; one failing (or the client leaving) cancels the rest."""
    if len(streams) == 1:
        return [await collect(service, streams[0])]
    jobs = [asyncio.ensure_future(collect(service, stream)) for stream in streams]
    try:
        return list(await asyncio.gather(*jobs))
    except BaseException:
        for job in jobs:
            job.cancel()
        for stream in streams:
            abandon(service, stream.task_id)
        raise


@dataclass(frozen=True)
class Generation:
    """What every chunk of one completion or chat answer says about its tasks."""

    id: str
    created: int
    model: str
    fingerprint: Optional[str]
    prompt_tokens: int
    include_usage: bool = False
    correlation: Optional[str] = None
    #: Token logprobs were asked for (they ride on the chunks).
    logprobs: bool = False

    def usage(self, completion_tokens: int) -> Usage:
        return Usage.of(self.prompt_tokens, completion_tokens)


class CompletionChunks:
    """``text_completion`` chunks; an echoed prompt is each choice's first one (sent once the
    prompt's logprobs arrive when they were asked for)."""

    def __init__(self, gen: Generation, prefix: str = "", prompt_logprobs: bool = False) -> None:
        self.gen = gen
        self.prefix = prefix
        self.prompt_logprobs = prompt_logprobs
        self._exclude = None if gen.include_usage else {"usage"}
        self._offsets: dict[int, int] = {}

    def _chunk(self, choices: list[CompletionChoice], usage: Optional[Usage] = None) -> str:
        chunk = Completion(id=self.gen.id, created=self.gen.created, model=self.gen.model,
                           system_fingerprint=self.gen.fingerprint, choices=choices, usage=usage)
        return sse.data(chunk.model_dump_json(exclude=self._exclude))

    def opening(self, index: int = 0) -> str:
        if not self.prefix or self.prompt_logprobs:
            return ""
        self._offsets[index] = len(self.prefix)
        return self.text(self.prefix, index)

    def prompt(self, index: int, entries: list[dict[str, Any]]) -> str:
        if not self.prefix:
            return ""
        logprobs, _ = completion_logprobs(entries, 0)
        self._offsets[index] = len(self.prefix)
        return self._chunk([CompletionChoice(text=self.prefix, index=index, logprobs=logprobs)])

    def text(self, text: str, index: int = 0, entries: Optional[list[dict[str, Any]]] = None) -> str:
        if entries is None:
            return self._chunk([CompletionChoice(text=text, index=index)])
        logprobs, self._offsets[index] = completion_logprobs(entries, self._offsets.get(index, 0))
        return self._chunk([CompletionChoice(text=text, index=index, logprobs=logprobs)])

    def pieces(self, index: int, pieces: list[dict[str, Any]]) -> str:
        out = []
        for piece in pieces:
            if "prompt_logprobs" in piece:
                if self.prompt_logprobs:  # else the echo went out with the opening, without logprobs
                    out.append(self.prompt(index, piece["prompt_logprobs"]))
            else:
                out.append(self.text(piece["t"], index, piece.get("logprobs") if self.gen.logprobs else None))
        return "".join(out)

    def closing(self, finish_reason: str, index: int = 0) -> str:
        return self._chunk([CompletionChoice(text="", index=index, finish_reason=finish_reason)])

    def usage(self, completion_tokens: int) -> str:
        return self._chunk([], self.gen.usage(completion_tokens)) if self.gen.include_usage else ""


class ChatChunks:
    """``chat.completion.chunk`` chunks: the role first, then content, then the finish."""

    def __init__(self, gen: Generation) -> None:
        self.gen = gen
        self._exclude = None if gen.include_usage else {"usage"}

    def _chunk(self, choices: list[ChatChunkChoice], usage: Optional[Usage] = None) -> str:
        chunk = ChatCompletionChunk(id=self.gen.id, created=self.gen.created, model=self.gen.model,
                                    system_fingerprint=self.gen.fingerprint, choices=choices, usage=usage)
        return sse.data(chunk.model_dump_json(exclude=self._exclude))

    def opening(self, index: int = 0) -> str:
        return self._chunk([ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))])

    def text(self, text: str, index: int = 0, entries: Optional[list[dict[str, Any]]] = None) -> str:
        logprobs = chat_logprobs(entries) if entries is not None else None
        return self._chunk([ChatChunkChoice(index=index, delta=ChatDelta(content=text), logprobs=logprobs)])

    def pieces(self, index: int, pieces: list[dict[str, Any]]) -> str:
        return "".join(self.text(piece["t"], index, piece.get("logprobs") if self.gen.logprobs else None)
                       for piece in pieces if "prompt_logprobs" not in piece)

    def closing(self, finish_reason: str, index: int = 0) -> str:
        return self._chunk([ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=finish_reason)])

    def usage(self, completion_tokens: int) -> str:
        return self._chunk([], self.gen.usage(completion_tokens)) if self.gen.include_usage else ""


Chunks = Union[CompletionChunks, ChatChunks]


def error_chunk(error: OrchError, correlation: Optional[str]) -> str:
    return sse.data(error_body(error, correlation).model_dump_json())


async def merged(streams: Sequence[TaskStream]) -> AsyncIterator[tuple[int, list[TaskEvent]]]:
    """(choice index, batch) from every stream as they come; one stream needs no hop."""
    if len(streams) == 1:
        async for batch in streams[0].batches():
            yield 0, batch
        return
    # Bounded, so a stream's cursor (its acknowledgement) runs at most one batch ahead of the client.
    queue: asyncio.Queue = asyncio.Queue(maxsize=len(streams))

    async def pump(index: int, stream: TaskStream) -> None:
        try:
            async for batch in stream.batches():
                await queue.put((index, batch))
        except Exception as exc:  # raised where the chunks are written
            await queue.put((index, exc))
        await queue.put((index, None))

    jobs = [asyncio.ensure_future(pump(index, stream)) for index, stream in enumerate(streams)]
    live = len(jobs)
    try:
        while live:
            index, item = await queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for job in jobs:
            job.cancel()


async def relay(service: TaskService, streams: Sequence[TaskStream], chunks: Chunks) -> AsyncIterator[str]:
    """OpenAI stream chunks for a request's tasks; cancels the unfinished ones if the client goes away."""
    correlation = chunks.gen.correlation
    running = set(range(len(streams)))
    tokens = 0
    try:
        opening = "".join(chunks.opening(index) for index in range(len(streams)))
        if opening:
            yield opening
        async for index, batch in merged(streams):
            if not batch:
                yield sse.OPENAI_KEEPALIVE
                continue
            pieces, terminal = split(batch)
            out = chunks.pieces(index, pieces) if pieces else ""
            if terminal is not None:
                kind, data = terminal
                running.discard(index)
                if kind == EventKind.error.value:
                    yield out + error_chunk(pool_error(data), correlation) + sse.DONE
                    return
                end = SSEEnd.model_validate(data)
                tokens += end.tokens_out
                out += chunks.closing(end.finish_reason.value, index)
                if not running:
                    yield out + chunks.usage(tokens) + sse.DONE
                    return
            if out:
                yield out
        ended = OrchError(ErrorCode.INTERNAL, "the stream ended without an end event")
        yield error_chunk(ended, correlation) + sse.DONE
    except Exception as exc:  # after the headers went out, errors can only travel as chunks
        log.exception("stream of task %s failed", streams[0].task_id)
        error = exc if isinstance(exc, OrchError) else OrchError(ErrorCode.INTERNAL, "the stream failed; the "
                                                                 "correlation id identifies it in the logs")
        yield error_chunk(error, correlation) + sse.DONE
    finally:
        for index in running:
            abandon(service, streams[index].task_id)
