"""What each OpenAI-compatible endpoint does, answering with the protocol's models.

``model`` names what ``/v1/models`` lists (a pool's aliases and its model's display name)
or a pool's model ref (``orch.core.placement.match_model``); anything else is a 404
``model_not_found``. Errors before a stream starts are raised (the router answers them as
HTTP errors); field acceptance is described in ``orch.api.openai``.
"""

from __future__ import annotations

import base64
import struct
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional, Union

from pydantic import BaseModel, ValidationError

from orch.api.errors import ErrorCode
from orch.api.openai import (
    DEFAULT_MAX_TOKENS,
    MODEL_NOT_FOUND,
    UNSUPPORTED_PARAMETER,
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    EmbeddingCreateRequest,
    EmbeddingItem,
    EmbeddingList,
    EmbeddingUsage,
    GenerationRequest,
    ModelCard,
    ModelList,
)
from orch.api.pools import PoolView
from orch.api.tasks import EmbeddingRequest, PlacementOverrides, TaskRequest
from orch.core.chat import ChatError, ChatTemplateError, RenderedChat, render_chat
from orch.core.errors import OrchError
from orch.core.placement import match_model, served_names
from orch.serve.openai.errors import OpenAIRequestError, refused
from orch.serve.openai.streams import ChatChunks, Chunks, CompletionChunks, Generation, abandon, collect, relay
from orch.serve.registry import PoolRegistry
from orch.serve.service import Admitted, AnyTask, TaskService, TaskStream


@dataclass(frozen=True)
class Answer:
    """A whole answer (``stream: false``, embeddings, models)."""

    body: BaseModel
    task_id: Optional[str] = None


@dataclass(frozen=True)
class Streamed:
    """Stream chunks, ``data: [DONE]`` last."""

    chunks: AsyncIterator[str]
    task_id: str


Reply = Union[Answer, Streamed]
#: A chat template that is there but not fetched yet (never equal to a real one).
UNKNOWN = object()


@dataclass(frozen=True)
class Target:
    """Where a request's ``model`` leads: the ref placement matches and the Ready pools
    serving it."""

    model_ref: str
    pools: tuple[PoolView, ...]

    def default_max_tokens(self) -> int:
        """``DEFAULT_MAX_TOKENS``, bounded so that every candidate pool can take it."""
        limit = DEFAULT_MAX_TOKENS
        for pool in self.pools:
            if pool.max_tokens_out:
                limit = min(limit, pool.max_tokens_out)
            if pool.ctx_max:
                limit = min(limit, pool.ctx_max // 2)
        return max(1, limit)


def fingerprint(pool: Optional[PoolView]) -> Optional[str]:
    """``system_fingerprint``: the engine and its version, which decide the output."""
    if pool is None or not pool.engine_version:
        return None
    return f"{pool.engine}-{pool.engine_version}"


def encode_base64(vector: list[float]) -> str:
    """Little-endian float32 bytes in base64, as OpenAI's ``encoding_format: base64``."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


class OpenAIServing:
    def __init__(self, service: TaskService, registry: PoolRegistry) -> None:
        self.service = service
        self.registry = registry

    # -- models --------------------------------------------------------------------------
    async def target(self, model: str, workload: str) -> Target:
        match = match_model(await self.registry.views(), model, workload)
        if match is None:
            raise OpenAIRequestError(ErrorCode.NOT_FOUND, f"the model '{model}' does not exist here; GET /v1/models "
                                     "lists the models served", param="model", openai_code=MODEL_NOT_FOUND)
        if not match.offered:
            raise OpenAIRequestError(ErrorCode.INVALID_PARAMS, f"the model '{model}' is not served for {workload}s "
                                     "here", param="model")
        return Target(match.model_ref, match.serving)

    async def models(self) -> ModelList:
        return ModelList(data=list((await self._cards()).values()))

    async def model(self, name: str) -> ModelCard:
        card = (await self._cards()).get(name)
        if card is None:
            raise OpenAIRequestError(ErrorCode.NOT_FOUND, f"the model '{name}' does not exist here", param="model",
                                     openai_code=MODEL_NOT_FOUND)
        return card

    async def _cards(self) -> dict[str, ModelCard]:
        cards: dict[str, ModelCard] = {}
        for pool in sorted(await self.registry.views(), key=lambda p: p.pool_id):
            if pool.ready:
                for name in served_names(pool):
                    cards.setdefault(name, ModelCard(id=name))
        return cards

    # -- generation ----------------------------------------------------------------------
    async def completion(self, req: CompletionRequest, correlation: Optional[str]) -> Reply:
        target = await self.target(req.model, "completion")
        prompt = req.prompt_text()
        task = task_request(req, prompt, target, req.stop_list())
        return await self._generate(req, task, correlation, echo=prompt if req.echo else "")

    async def chat(self, req: ChatCompletionRequest, correlation: Optional[str]) -> Reply:
        target = await self.target(req.model, "completion")
        rendered, placement = self._render(req, target)
        stop = req.stop_list()
        stop += [s for s in rendered.stop if s not in stop]
        task = task_request(req, rendered.prompt, target, stop, placement, prompt_param="messages")
        return await self._generate(req, task, correlation, chat=True)

    def _render(self, req: ChatCompletionRequest,
                target: Target) -> tuple[RenderedChat, Optional[PlacementOverrides]]:
        """The prompt, rendered with the first candidate pool's chat template, and the
        placement that keeps the task on pools known to have that same template."""
        first = target.pools[0] if target.pools else None
        template, special = self._template(first) if first is not None else (None, None)
        try:
            rendered = render_chat(req.messages, template, special)
        except ChatError as exc:
            raise OpenAIRequestError(ErrorCode.INVALID_PARAMS, exc.message, param=exc.param) from None
        except ChatTemplateError as exc:
            raise OrchError(ErrorCode.INTERNAL, f"{exc} (pool '{first.pool_id}')", pool_id=first.pool_id) from None
        same = [pool.pool_id for pool in target.pools if self._template(pool, known=False)[0] == template]
        if len(same) < len(target.pools):  # pools disagree on the template: stay on those rendered for
            return rendered, PlacementOverrides(prefer_pools=same, allow_fallback=False)
        return rendered, None

    def _template(self, pool: PoolView, known: bool = True) -> tuple[Any, Optional[dict[str, Any]]]:
        """The pool's chat template (None: its model has none) and special tokens. A template
        this ingress has not fetched yet is refused as retriable, or with ``known=False``
        given as ``UNKNOWN``, which equals no template."""
        detail = self.registry.model_detail(pool.pool_id)
        if detail is not None:
            return detail.chat_template, detail.special_tokens
        if not pool.has_chat_template:
            return None, None
        if not known:
            return UNKNOWN, None
        raise OrchError(ErrorCode.POOL_UNREADY, f"the chat template of pool '{pool.pool_id}' is not known to this "
                        "ingress yet; retry shortly", retriable=True, retry_after_ms=1000, pool_id=pool.pool_id)

    async def _generate(self, req: GenerationRequest, task: TaskRequest, correlation: Optional[str], *,
                        chat: bool = False, echo: str = "") -> Reply:
        admitted, stream, pool = await self._admit(task, correlation)
        gen = Generation(("chatcmpl-" if chat else "cmpl-") + admitted.task_id, int(time.time()), req.model,
                         fingerprint(pool), admitted.result.prompt_tokens, req.include_usage, correlation)
        if req.stream:
            chunks: Chunks = ChatChunks(gen) if chat else CompletionChunks(gen, echo)
            return Streamed(relay(self.service, stream, chunks), admitted.task_id)
        done = await collect(self.service, stream)
        finish = done.end.finish_reason.value
        if chat:
            body: BaseModel = ChatCompletion(
                id=gen.id, created=gen.created, model=gen.model, system_fingerprint=gen.fingerprint,
                choices=[ChatChoice(message=AssistantMessage(content=done.text), finish_reason=finish)],
                usage=gen.usage(done.tokens))
        else:
            body = Completion(
                id=gen.id, created=gen.created, model=gen.model, system_fingerprint=gen.fingerprint,
                choices=[CompletionChoice(text=echo + done.text, finish_reason=finish)],
                usage=gen.usage(done.tokens))
        return Answer(body, admitted.task_id)

    async def _admit(self, task: AnyTask,
                     correlation: Optional[str]) -> tuple[Admitted, TaskStream, Optional[PoolView]]:
        """Admit and attach; a task whose stream cannot be opened is cancelled, not left running."""
        admitted = await self.service.admit(task, correlation)
        try:
            stream = await self.service.open_stream(admitted.task_id)
            pool = (await self.registry.rows()).get(admitted.pool_id)
        except BaseException:
            abandon(self.service, admitted.task_id)
            raise
        return admitted, stream, pool

    # -- embeddings ----------------------------------------------------------------------
    async def embeddings(self, req: EmbeddingCreateRequest, correlation: Optional[str]) -> Reply:
        target = await self.target(req.model, "embedding")
        try:
            task = EmbeddingRequest(inputs=req.inputs(), model_ref=target.model_ref)
        except ValidationError as exc:
            raise refused(exc, param="input") from None
        admitted, stream, _ = await self._admit(task, correlation)
        end = (await collect(self.service, stream)).end
        vectors = end.embeddings or []
        if req.dimensions is not None and vectors and req.dimensions != len(vectors[0]):
            raise OpenAIRequestError(ErrorCode.INVALID_PARAMS, f"dimensions {req.dimensions} is not available: "
                                     f"model '{req.model}' gives {len(vectors[0])}-dimensional vectors",
                                     param="dimensions", openai_code=UNSUPPORTED_PARAMETER)
        tokens = end.tokens_in if end.tokens_in is not None else admitted.result.prompt_tokens
        data = [EmbeddingItem(index=index, embedding=encode_base64(vector) if req.encoding_format == "base64"
                              else vector) for index, vector in enumerate(vectors)]
        usage = EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
        return Answer(EmbeddingList(data=data, model=req.model, usage=usage), admitted.task_id)


def task_request(req: GenerationRequest, prompt: str, target: Target, stop: list[str],
                 placement: Optional[PlacementOverrides] = None, prompt_param: str = "prompt") -> TaskRequest:
    """The task a completion or chat request stands for; an invalid prompt is named as the
    request called it (``prompt_param``)."""
    limit = req.output_limit()
    fields = {
        "prompt": prompt,
        "max_tokens": limit if limit is not None else target.default_max_tokens(),
        "model_ref": target.model_ref,
        "seed": req.seed,
        "stop": stop,
        "placement": placement,
    }
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "ignore_eos"):
        if getattr(req, name) is not None:
            fields[name] = getattr(req, name)
    try:
        return TaskRequest(**fields)
    except ValidationError as exc:
        error = refused(exc)
        if error.param == "prompt":
            error.param = prompt_param
        raise error from None
