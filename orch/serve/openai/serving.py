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
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    EmbeddingCreateRequest,
    EmbeddingItem,
    EmbeddingList,
    EmbeddingUsage,
    GenerationRequest,
    ModelCard,
    ModelList,
)
from orch.api.models import ModelStatus
from orch.api.openai.models import ModelPool
from orch.api.pools import PoolView
from orch.api.tasks import MAX_SEED, EmbeddingRequest, PlacementOverrides, TaskRequest
from orch.core import engine_features
from orch.core.chat import ChatError, ChatTemplateError, RenderedChat
from orch.core.tools import ToolPlan
from orch.core.errors import OrchError
from orch.core.placement import match_model, served_names
from orch.serve.openai.errors import OpenAIRequestError, refused
from orch.observability.logs import bind
from orch.serve.openai import tools as chat_tools
from orch.serve.openai.logprobs import chat_logprobs, completion_logprobs
from orch.serve.openai.streams import (
    Chunks,
    Collected,
    CompletionChunks,
    Generation,
    abandon,
    collect,
    collect_all,
    relay,
)
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
        await self.registry.ensure_model(model, wait=True)  # a cold model of the set: load it, wait for it
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
                parameters = sorted(engine_features.supported(pool.engine))
                for name in served_names(pool):
                    card = cards.setdefault(name, ModelCard(id=name))
                    card.pools.append(ModelPool(pool_id=pool.pool_id, engine=pool.engine, parameters=parameters))
        if self.registry.demand is not None:  # every model of the set, loaded or not
            for model in (await self.registry.demand.state())["models"]:
                cards.setdefault(model["id"], ModelCard(id=model["id"])).model_set = ModelStatus(**model)
        return cards

    # -- generation ----------------------------------------------------------------------
    async def completion(self, req: CompletionRequest, correlation: Optional[str]) -> Reply:
        bind(user=req.user)
        target = await self.target(req.model, "completion")
        prompt = req.prompt_text()
        task = task_request(req, prompt, target, req.stop_list(), logprobs=req.logprobs,
                            prompt_logprobs=_prompt_logprobs(req))
        task = task.model_copy(update={"placement": honouring(target, task, None, V1_NAMES)})
        return await self._generate(req, task, correlation, echo=prompt if req.echo else "")

    async def chat(self, req: ChatCompletionRequest, correlation: Optional[str]) -> Reply:
        bind(user=req.user)
        target = await self.target(req.model, "completion")
        rendered, placement, plan = self._render(req, target)
        stop = req.stop_list()
        stop += [s for s in rendered.stop if s not in stop]
        task = task_request(req, rendered.prompt, target, stop, placement, prompt_param="messages",
                            logprobs=req.alternatives())
        names = V1_NAMES
        if plan.constrained:  # the output is a call: its arguments are held to the function's schema
            task = task.model_copy(update={"json_schema": plan.schema_text()})
            names = {**V1_NAMES, "json_schema": "tool_choice"}
        task = task.model_copy(update={"placement": honouring(target, task, placement, names)})
        return await self._generate(req, task, correlation, chat=True, tools=plan)

    def _render(self, req: ChatCompletionRequest,
                target: Target) -> tuple[RenderedChat, Optional[PlacementOverrides], ToolPlan]:
        """The prompt, rendered with the first candidate pool's chat template (and the
        request's tools), the placement that keeps the task on pools known to have that same
        template, and what to do with tools."""
        first = target.pools[0] if target.pools else None
        template, special = self._template(first) if first is not None else (None, None)
        try:
            rendered, plan = chat_tools.render(req, template, special)
        except ChatError as exc:
            raise OpenAIRequestError(ErrorCode.INVALID_PARAMS, exc.message, param=exc.param,
                                     openai_code=getattr(exc, "openai_code", None)) from None
        except ChatTemplateError as exc:
            raise OrchError(ErrorCode.INTERNAL, f"{exc} (pool '{first.pool_id}')", pool_id=first.pool_id) from None
        same = [pool.pool_id for pool in target.pools if self._template(pool, known=False)[0] == template]
        if len(same) < len(target.pools):  # pools disagree on the template: stay on those rendered for
            return rendered, PlacementOverrides(prefer_pools=same, allow_fallback=False), plan
        return rendered, None, plan

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
                        chat: bool = False, echo: str = "", tools: ToolPlan = ToolPlan()) -> Reply:
        admitted, streams, pool = await self._admit_choices(task, req.choices, correlation)
        first = admitted[0]
        gen = Generation(("chatcmpl-" if chat else "cmpl-") + first.task_id, int(time.time()), req.model,
                         fingerprint(pool), first.result.prompt_tokens, req.include_usage, correlation,
                         logprobs=task.logprobs is not None)
        if req.stream:
            chunks: Chunks = chat_tools.chat_chunks(gen, tools) if chat else CompletionChunks(
                gen, echo, prompt_logprobs=task.prompt_logprobs is not None and req.logprobs is not None)
            return Streamed(relay(self.service, streams, chunks), first.task_id)
        done = await collect_all(self.service, streams)
        usage = gen.usage(sum(choice.tokens for choice in done))
        if chat:
            body: BaseModel = ChatCompletion(
                id=gen.id, created=gen.created, model=gen.model, system_fingerprint=gen.fingerprint, usage=usage,
                choices=[chat_tools.chat_choice(tools, index, choice.text, choice.end.finish_reason.value,
                                                chat_logprobs(choice.logprobs) if gen.logprobs else None)
                         for index, choice in enumerate(done)])
        else:
            body = Completion(
                id=gen.id, created=gen.created, model=gen.model, system_fingerprint=gen.fingerprint, usage=usage,
                choices=[CompletionChoice(index=index, text=echo + choice.text, finish_reason=choice.end.finish_reason.value,
                                          logprobs=_completion_logprobs(choice, echo, req))
                         for index, choice in enumerate(done)])
        return Answer(body, first.task_id)

    async def _admit_choices(self, task: TaskRequest, n: int, correlation: Optional[str]
                             ) -> tuple[list[Admitted], list[TaskStream], Optional[PoolView]]:
        """One task per choice, all on the pool the first was placed on (so a batching engine
        decodes them together), seeded ``seed + index``; if one cannot be admitted, those
        already admitted are cancelled."""
        admitted: list[Admitted] = []
        streams: list[TaskStream] = []
        pool: Optional[PoolView] = None
        try:
            for index in range(n):
                choice = task if index == 0 else task.model_copy(update={
                    "task_id": None, "seed": None if task.seed is None else (task.seed + index) % (MAX_SEED + 1),
                    "placement": PlacementOverrides(pin_pool_id=admitted[0].pool_id)})
                one, stream, row = await self._admit(choice, correlation)
                admitted.append(one)
                streams.append(stream)
                pool = pool or row
        except BaseException:
            for one in admitted:
                abandon(self.service, one.task_id)
            raise
        return admitted, streams, pool

    async def _admit(self, task: AnyTask,
                     correlation: Optional[str]) -> tuple[Admitted, TaskStream, Optional[PoolView]]:
        """Admit and attach; a task whose stream cannot be opened is cancelled, not left running."""
        admitted = await self.service.admit(task, correlation)
        try:
            stream = await self.service.open_stream(admitted.task_id)
            pool = (await self.registry.rows(fresh=False)).get(admitted.pool_id)
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


#: /v1 names of the parameters ``orch.core.engine_features`` knows by their /v2 names.
V1_NAMES = {"json_schema": "response_format", "prompt_logprobs": "echo"}
#: Sampling fields passed on as the request gives them (None: the task's default).
_PASSED = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "ignore_eos", "presence_penalty",
           "frequency_penalty", "typical_p", "logit_bias", "min_tokens", "user")


def task_request(req: GenerationRequest, prompt: str, target: Target, stop: list[str],
                 placement: Optional[PlacementOverrides] = None, prompt_param: str = "prompt", *,
                 logprobs: Optional[int] = None, prompt_logprobs: Optional[int] = None) -> TaskRequest:
    """The task a completion or chat request stands for (one choice); an invalid prompt is
    named as the request called it (``prompt_param``)."""
    limit = req.output_limit()
    fields = {
        "prompt": prompt,
        "max_tokens": limit if limit is not None else target.default_max_tokens(),
        "model_ref": target.model_ref,
        "seed": req.seed,
        "stop": stop,
        "placement": placement,
        "logprobs": logprobs,
        "prompt_logprobs": prompt_logprobs,
        "json_schema": req.json_schema(),
    }
    for name in _PASSED:
        if getattr(req, name) is not None:
            fields[name] = getattr(req, name)
    try:
        return TaskRequest(**fields)
    except ValidationError as exc:
        error = refused(exc)
        if error.param == "prompt":
            error.param = prompt_param
        elif error.param == "json_schema":
            error.param = "response_format"
        raise error from None


def honouring(target: Target, task: TaskRequest, placement: Optional[PlacementOverrides],
              names: dict[str, str]) -> Optional[PlacementOverrides]:
    """``placement``, narrowed to the candidate pools whose engine honours every parameter the
    task sets; when none does, the typed 400 naming the parameter (as the request called it,
    ``names``) and the engine. Pools not Ready yet are left to check at their admission."""
    wanted = engine_features.requested(task)
    if not wanted or not target.pools:
        return placement
    able = [pool for pool in target.pools if not engine_features.unsupported(pool.engine, wanted)]
    allowed = set(placement.prefer_pools) if placement is not None and placement.prefer_pools else None
    able_ids = [pool.pool_id for pool in able if allowed is None or pool.pool_id in allowed]
    if not able_ids:
        pool = target.pools[0]
        missing = engine_features.unsupported(pool.engine, wanted) or wanted
        error = engine_features.refusal(pool.engine, missing[0], pool.pool_id, names.get(missing[0], missing[0]))
        raise OpenAIRequestError(error.code, error.message, param=names.get(missing[0], missing[0]),
                                 openai_code=UNSUPPORTED_PARAMETER, engine=pool.engine, pool_id=pool.pool_id)
    if len(able_ids) == len(target.pools):
        return placement
    return PlacementOverrides(prefer_pools=able_ids, allow_fallback=False)


def _prompt_logprobs(req: CompletionRequest) -> Optional[int]:
    """The prompt's logprobs are needed for ``echo`` with ``logprobs``, and to answer
    ``max_tokens: 0`` (nothing generated) at all."""
    if req.echo and req.logprobs is not None:
        return req.logprobs
    return 0 if req.echo and req.max_tokens == 0 else None


def _completion_logprobs(choice: Collected, echo: str, req: CompletionRequest) -> Optional[CompletionLogprobs]:
    """``choices[].logprobs`` of a completion: the echoed prompt's tokens (first logprob null), then the output's."""
    if req.logprobs is None:
        return None
    entries = (choice.prompt_logprobs or []) + choice.logprobs if echo else choice.logprobs
    return completion_logprobs(entries, 0)[0]
