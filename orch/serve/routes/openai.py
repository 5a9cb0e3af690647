"""OpenAI-compatible API: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/embeddings``,
``/v1/models``.

Each request becomes a ``TaskRequest`` (or an ``EmbeddingRequest``) admitted through
``TaskService``, so sessions, placement, the pool's admission and its bounded queue apply as
they do to ``/v2/tasks``. Chat messages are rendered here with the model's own template
(``orch.core.chat``); the pool only sees a prompt.

``model`` names what ``/v1/models`` lists (a pool's aliases and its model's display name)
or a pool's model ref; anything else is a 404 ``model_not_found``. Streams relay the task's
events in batches (one hop per batch, one ``data:`` chunk per token) and end with
``data: [DONE]``; a client that goes away mid-stream has its task cancelled, so its slot is
freed. Errors before the stream starts are plain HTTP errors; an ``error`` event during
the stream becomes an error chunk followed by ``[DONE]``. Field acceptance is described in
``orch.api.openai``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import struct
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from orch.api.errors import ErrorCode
from orch.api.openai import (
    DEFAULT_MAX_TOKENS,
    MODEL_NOT_FOUND,
    OWNED_BY,
    UNKNOWN_PARAMETER,
    UNSUPPORTED_PARAMETER,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    EmbeddingCreateRequest,
    EmbeddingList,
    ModelCard,
    ModelList,
    OpenAIErrorResponse,
    error_type,
)
from orch.api.tasks import EmbeddingRequest, PlacementOverrides, TaskRequest
from orch.core.chat import ChatError, ChatTemplateError, render_chat
from orch.core.errors import OrchError
from orch.core.model_ref import display_name
from orch.serve import sse
from orch.serve.http import correlation_id, error_response, explain_validation, read_json
from orch.serve.routing import ApiRoute
from orch.serve.service import Admitted, TaskService, TaskStream
from orch.serve.state import IngressState

log = logging.getLogger("orch.ingress")

PREFIX = "/v1/"
DONE = "data: [DONE]\n\n"
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
#: Cancels started for streams whose client went away (kept so they are not collected).
_abandoned: set[asyncio.Task] = set()


# --------------------------------------------------------------------------- errors


class OpenAIRequestError(OrchError):
    """An OrchError that also names the offending field and, where one fits, an
    OpenAI-specific ``code`` (model_not_found, unsupported_parameter, unknown_parameter)."""

    def __init__(self, code: ErrorCode, message: str, *, param: Optional[str] = None,
                 openai_code: Optional[str] = None, **fields: Any) -> None:
        super().__init__(code, message, **fields)
        self.param = param
        self.openai_code = openai_code


def is_openai_path(request: Request) -> bool:
    """True for the /v1 routes, wherever the app is mounted."""
    path = request.scope.get("path", "")
    root = request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path.startswith(PREFIX)


def error_body(exc: OrchError, correlation: Optional[str] = None) -> dict[str, Any]:
    """OpenAI's ``{"error": {message, type, param, code}}`` with the orchestrator's details."""
    detail: dict[str, Any] = {
        "message": exc.message,
        "type": error_type(exc.http_status),
        "param": getattr(exc, "param", None),
        "code": getattr(exc, "openai_code", None) or exc.code.value,
    }
    for key, value in exc.to_dict().items():
        if key not in ("code", "message"):
            detail[key] = value
    if correlation:
        detail["correlation_id"] = correlation
    return {"error": detail}


def error_response_openai(exc: OrchError, request: Request, status: Optional[int] = None) -> JSONResponse:
    """The v2 answer's status and backpressure headers (Retry-After, X-Backoff-Ms) with the
    body in OpenAI's shape."""
    plain = error_response(exc, request)
    envelope = json.loads(plain.body)
    body = error_body(exc, envelope.get("correlation_id"))
    for key in ("retriable", "retry_after_ms", "policy_label"):
        if key in envelope:
            body["error"][key] = envelope[key]
    headers = {name: value for name, value in plain.headers.items() if name in ("retry-after", "x-backoff-ms")}
    return JSONResponse(body, status_code=status or plain.status_code, headers=headers)


def _param(loc: tuple) -> Optional[str]:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or None


#: Validation error types that have an OpenAI code of their own.
_OPENAI_CODES = {UNSUPPORTED_PARAMETER: UNSUPPORTED_PARAMETER, "extra_forbidden": UNKNOWN_PARAMETER}


def _refused(exc: ValidationError) -> OpenAIRequestError:
    first = exc.errors()[0]
    openai_code = _OPENAI_CODES.get(first["type"])
    return OpenAIRequestError(ErrorCode.INVALID_PARAMS, explain_validation(exc), param=_param(first["loc"]),
                              openai_code=openai_code)


def _validated(model: type[BaseModel], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _refused(exc) from None


# --------------------------------------------------------------------------- models


def model_ids(row: dict[str, Any]) -> list[str]:
    """Names /v1/models lists for a pool: its aliases, then its model's display name."""
    ids = list(row.get("model_aliases") or ())
    name = display_name(row["model_ref"])
    if name not in ids:
        ids.append(name)
    return ids


@dataclass
class Target:
    """Where a request's ``model`` leads: the ref placement matches and the pools serving it."""

    model_ref: str
    rows: list[dict[str, Any]]  # Ready pools serving the model and the workload

    def default_max_tokens(self) -> int:
        """``DEFAULT_MAX_TOKENS``, bounded so that every candidate pool can take it."""
        limit = DEFAULT_MAX_TOKENS
        for row in self.rows:
            if row.get("max_tokens_out"):
                limit = min(limit, row["max_tokens_out"])
            if row.get("ctx_max"):
                limit = min(limit, row["ctx_max"] // 2)
        return max(1, limit)


def resolve_model(rows: dict[str, dict[str, Any]], model: str, workload: str) -> Target:
    matched = [row for _, row in sorted(rows.items())
               if model == row["model_ref"] or model in model_ids(row)]
    if not matched:
        raise OpenAIRequestError(ErrorCode.NOT_FOUND, f"the model '{model}' does not exist here; GET /v1/models lists "
                                 "the models served", param="model", openai_code=MODEL_NOT_FOUND)
    by_alias = any(model == row["model_ref"] or model in (row.get("model_aliases") or ()) for row in matched)
    model_ref = model if by_alias else matched[0]["model_ref"]
    relevant = [row for row in matched
                if model_ref == row["model_ref"] or model_ref in (row.get("model_aliases") or ())]
    offers = [row for row in relevant if workload in row.get("workloads", ("completion",))]
    if not offers and all(row.get("ready") for row in relevant):
        # Only a loaded pool knows its workloads; one still loading is left to placement.
        raise OpenAIRequestError(ErrorCode.INVALID_PARAMS, f"the model '{model}' is not served for {workload}s here",
                                 param="model")
    serving = [row for row in offers if row.get("ready") and not row.get("draining")]
    return Target(model_ref, serving)


def _fingerprint(row: Optional[dict[str, Any]]) -> Optional[str]:
    if not row or not row.get("engine_version"):
        return None
    return f"{row['engine']}-{row['engine_version']}"


# --------------------------------------------------------------------------- relay


def _abandon(service: TaskService, task_id: str) -> None:
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


def _split(batch: list[tuple[int, str, dict[str, Any]]]) -> tuple[list[str], Optional[tuple[str, dict[str, Any]]]]:
    texts = []
    for _, kind, data in batch:
        if kind == "token":
            texts.append(data["t"])
        elif kind in ("end", "error"):
            return texts, (kind, data)
    return texts, None


async def _collect(service: TaskService, stream: TaskStream) -> tuple[str, int, dict[str, Any]]:
    """The whole generation: text, tokens, ``end`` data. An ``error`` event is raised."""
    finished = False
    texts: list[str] = []
    try:
        async for batch in stream.batches():
            pieces, terminal = _split(batch)
            texts += pieces
            if terminal is not None:
                finished = True
                kind, data = terminal
                if kind == "error":
                    raise OrchError.from_dict(data)
                return "".join(texts), len(texts), data
        finished = True
        raise OrchError(ErrorCode.INTERNAL, f"the stream of task {stream.task_id} ended without an end event")
    finally:
        if not finished:
            _abandon(service, stream.task_id)


def _stream_error_chunk(data: dict[str, Any], correlation: Optional[str]) -> str:
    try:
        error = OrchError.from_dict(data)
    except (KeyError, ValueError):
        error = OrchError(ErrorCode.INTERNAL, str(data.get("message", "the task failed")))
    return f"data: {_dumps(error_body(error, correlation))}\n\n"


@dataclass
class _Generation:
    """What a completion or chat answer says about its task."""

    id: str
    created: int
    model: str
    fingerprint: Optional[str]
    prompt_tokens: int
    correlation: Optional[str] = None

    def base(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}


async def _sse(service: TaskService, stream: TaskStream, gen: _Generation, *, chat: bool,
               include_usage: bool, prefix: str = "") -> AsyncIterator[str]:
    """OpenAI stream chunks for one task; cancels the task if the client goes away."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    base = gen.base(kind)
    if include_usage:
        base["usage"] = None

    def chunk(text: Optional[str], finish: Optional[str] = None, role: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if role else (
                {"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}
        return f"data: {_dumps(dict(base, choices=[choice]))}\n\n"

    finished = False
    tokens = 0
    try:
        if chat:
            yield chunk("", role=True)
        elif prefix:
            yield chunk(prefix)
        async for batch in stream.batches():
            if not batch:
                yield sse.KEEPALIVE
                continue
            texts, terminal = _split(batch)
            tokens += len(texts)
            out = "".join(chunk(text) for text in texts)
            if terminal is not None:
                finished = True
                end_kind, data = terminal
                if end_kind == "error":
                    out += _stream_error_chunk(data, gen.correlation)
                else:
                    out += chunk(None, data.get("finish_reason", "stop"))
                    if include_usage:
                        out += f"data: {_dumps(dict(base, choices=[], usage=gen.usage(tokens)))}\n\n"
                yield out + DONE
                return
            if out:
                yield out
        finished = True
        ended = {"code": ErrorCode.INTERNAL.value, "message": "the stream ended without an end event"}
        yield _stream_error_chunk(ended, gen.correlation)
        yield DONE
    except Exception as exc:  # after the headers went out, errors can only travel as chunks
        finished = True
        log.exception("stream of task %s failed", stream.task_id)
        error = exc if isinstance(exc, OrchError) else OrchError(ErrorCode.INTERNAL, "the stream failed; the "
                                                                 "correlation id identifies it in the logs")
        yield f"data: {_dumps(error_body(error, gen.correlation))}\n\n" + DONE
    finally:
        if not finished:
            _abandon(service, stream.task_id)


def _streaming(body: AsyncIterator[str], task_id: str) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Task-Id": task_id})


# --------------------------------------------------------------------------- routes


def routes(state: IngressState) -> list[ApiRoute]:
    service = state.service
    registry = state.registry
    max_body = state.config.server.max_body_bytes

    def task_request(req: Any, prompt: str, target: Target, stop: list[str], max_tokens: Optional[int],
                     placement: Optional[PlacementOverrides] = None, prompt_param: str = "prompt") -> TaskRequest:
        fields: dict[str, Any] = {
            "prompt": prompt,
            "max_tokens": max_tokens if max_tokens is not None else target.default_max_tokens(),
            "model_ref": target.model_ref,
            "seed": req.seed,
            "stop": stop,
            "placement": placement,
        }
        for name in ("temperature", "top_p", "top_k"):
            if getattr(req, name) is not None:
                fields[name] = getattr(req, name)
        try:
            return TaskRequest(**fields)
        except ValidationError as exc:
            error = _refused(exc)
            if error.param == "prompt":
                error.param = prompt_param
            raise error from None

    async def admit(task: Any, request: Request) -> tuple[Admitted, TaskStream, Optional[dict[str, Any]]]:
        """Admit and attach; a task whose stream cannot be opened is cancelled, not left running."""
        admitted = await service.admit(task, correlation_id(request))
        try:
            stream = await service.open_stream(admitted.task_id)
            row = (await registry.rows()).get(admitted.pool_id)
        except BaseException:
            _abandon(service, admitted.task_id)
            raise
        return admitted, stream, row

    async def generate(request: Request, req: Any, task: TaskRequest, *, chat: bool, prefix: str = "") -> Response:
        admitted, stream, row = await admit(task, request)
        tag = "chatcmpl-" if chat else "cmpl-"
        gen = _Generation(tag + admitted.task_id, int(time.time()), req.model, _fingerprint(row),
                          int(admitted.result.get("prompt_tokens", 0)), correlation_id(request))
        if req.stream:
            return _streaming(_sse(service, stream, gen, chat=chat, include_usage=req.include_usage, prefix=prefix),
                              admitted.task_id)
        text, tokens, end = await _collect(service, stream)
        finish = end.get("finish_reason", "stop")
        if chat:
            answer: dict[str, Any] = dict(gen.base("chat.completion"), choices=[{
                "index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}])
        else:
            answer = dict(gen.base("text_completion"), choices=[{
                "text": prefix + text, "index": 0, "logprobs": None, "finish_reason": finish}])
        answer["usage"] = gen.usage(tokens)
        return JSONResponse(answer, headers={"X-Task-Id": admitted.task_id})

    async def completions(request: Request) -> Response:
        req: CompletionRequest = _validated(CompletionRequest, await read_json(request, max_body))
        target = resolve_model(await registry.rows(), req.model, "completion")
        prompt = req.prompt_text()
        task = task_request(req, prompt, target, req.stop_list(), req.max_tokens)
        return await generate(request, req, task, chat=False, prefix=prompt if req.echo else "")

    async def chat_completions(request: Request) -> Response:
        req: ChatCompletionRequest = _validated(ChatCompletionRequest, await read_json(request, max_body))
        target = resolve_model(await registry.rows(), req.model, "completion")
        template_row = target.rows[0] if target.rows else None
        template = template_row.get("chat_template") if template_row else None
        try:
            rendered = render_chat(req.messages, template, template_row.get("special_tokens") if template_row else None)
        except ChatError as exc:
            raise OpenAIRequestError(ErrorCode.INVALID_PARAMS, exc.message, param=exc.param) from None
        except ChatTemplateError as exc:
            raise OrchError(ErrorCode.INTERNAL, f"{exc} (pool '{template_row['pool_id']}')",
                            pool_id=template_row["pool_id"]) from None
        placement = None
        same = [row["pool_id"] for row in target.rows if row.get("chat_template") == template]
        if len(same) < len(target.rows):  # pools disagree on the template: stay on those rendered for
            placement = PlacementOverrides(prefer_pools=same, allow_fallback=False)
        stop = req.stop_list()
        stop += [s for s in rendered.stop if s not in stop]
        task = task_request(req, rendered.prompt, target, stop, req.output_limit(), placement, "messages")
        return await generate(request, req, task, chat=True)

    async def embeddings(request: Request) -> Response:
        req: EmbeddingCreateRequest = _validated(EmbeddingCreateRequest, await read_json(request, max_body))
        target = resolve_model(await registry.rows(), req.model, "embedding")
        try:
            task = EmbeddingRequest(inputs=req.inputs(), model_ref=target.model_ref)
        except ValidationError as exc:
            error = _refused(exc)
            error.param = "input"
            raise error from None
        admitted, stream, _ = await admit(task, request)
        _, _, end = await _collect(service, stream)
        vectors = end.get("embeddings") or []
        if req.dimensions is not None and vectors and req.dimensions != len(vectors[0]):
            raise OpenAIRequestError(ErrorCode.INVALID_PARAMS, f"dimensions {req.dimensions} is not available: "
                                     f"model '{req.model}' gives {len(vectors[0])}-dimensional vectors",
                                     param="dimensions", openai_code=UNSUPPORTED_PARAMETER)
        tokens = int(end.get("tokens_in", admitted.result.get("prompt_tokens", 0)))
        data = [{"object": "embedding", "index": index,
                 "embedding": _base64(vector) if req.encoding_format == "base64" else vector}
                for index, vector in enumerate(vectors)]
        answer = {"object": "list", "data": data, "model": req.model,
                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return JSONResponse(answer, headers={"X-Task-Id": admitted.task_id})

    async def served_models() -> dict[str, ModelCard]:
        cards: dict[str, ModelCard] = {}
        for _, row in sorted((await registry.rows()).items()):
            if row.get("ready"):
                for model_id in model_ids(row):
                    cards.setdefault(model_id, ModelCard(id=model_id, owned_by=OWNED_BY))
        return cards

    async def list_models(request: Request) -> Response:
        return JSONResponse(ModelList(data=list((await served_models()).values())).model_dump())

    async def get_model(request: Request) -> Response:
        model = request.path_params["model"]
        card = (await served_models()).get(model)
        if card is None:
            raise OpenAIRequestError(ErrorCode.NOT_FOUND, f"the model '{model}' does not exist here", param="model",
                                     openai_code=MODEL_NOT_FOUND)
        return JSONResponse(card.model_dump())

    def route(method: str, path: str, handler, summary: str, **kw: Any) -> ApiRoute:
        return ApiRoute(method, path, handler, summary, "openai", error_model=OpenAIErrorResponse, **kw)

    return [
        route("POST", "/v1/completions", completions,
              "Complete a prompt (OpenAI-compatible); with stream: true, SSE chunks ending with [DONE]",
              body=CompletionRequest, answers={200: Completion}),
        route("POST", "/v1/chat/completions", chat_completions,
              "Answer a conversation rendered with the model's chat template (OpenAI-compatible); "
              "with stream: true, SSE chat.completion.chunk lines ending with [DONE]",
              body=ChatCompletionRequest, answers={200: ChatCompletion}),
        route("POST", "/v1/embeddings", embeddings, "Embed one or more texts (OpenAI-compatible)",
              body=EmbeddingCreateRequest, answers={200: EmbeddingList}),
        route("GET", "/v1/models", list_models, "Models served by Ready pools (OpenAI-compatible)",
              answers={200: ModelList}, errors=(401,)),
        route("GET", "/v1/models/{model}", get_model, "One served model (OpenAI-compatible)",
              answers={200: ModelCard}, errors=(401, 404)),
    ]


def _base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
