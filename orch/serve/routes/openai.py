"""OpenAI-compatible API: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/embeddings``,
``/v1/models``.

The router only reads and validates bodies and turns replies into HTTP; what each endpoint
does is ``orch.serve.openai.serving``, the contract ``orch.api.openai``.
"""

from __future__ import annotations

from typing import Any, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from orch.api.openai import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    EmbeddingCreateRequest,
    EmbeddingList,
    ModelCard,
    ModelList,
    OpenAIErrorResponse,
)
from orch.serve.http import correlation_id, read_json
from orch.serve.openai.errors import error_response_openai, is_openai_path, validated
from orch.serve.openai.serving import Answer, OpenAIServing, Reply
from orch.serve.routing import ApiRoute
from orch.serve.state import IngressState

__all__ = ["error_response_openai", "is_openai_path", "respond", "routes"]


def respond(reply: Reply) -> Response:
    headers = {"X-Task-Id": reply.task_id} if reply.task_id else None
    if isinstance(reply, Answer):
        return JSONResponse(reply.body.model_dump(mode="json"), headers=headers)
    return StreamingResponse(reply.chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})


def routes(state: IngressState) -> list[ApiRoute]:
    serving = OpenAIServing(state.service, state.registry)
    max_body = state.config.server.max_body_bytes

    def generation(model: type, serve: Callable) -> Callable:
        async def handler(request: Request) -> Response:
            req = validated(model, await read_json(request, max_body))
            return respond(await serve(req, correlation_id(request)))
        return handler

    async def list_models(request: Request) -> Response:
        return JSONResponse((await serving.models()).model_dump(mode="json"))

    async def get_model(request: Request) -> Response:
        return JSONResponse((await serving.model(request.path_params["model"])).model_dump(mode="json"))

    def route(method: str, path: str, handler, summary: str, **kw: Any) -> ApiRoute:
        return ApiRoute(method, path, handler, summary, "openai", error_model=OpenAIErrorResponse, scope="infer", **kw)

    return [
        route("POST", "/v1/completions", generation(CompletionRequest, serving.completion),
              "Complete a prompt (OpenAI-compatible); with stream: true, SSE chunks ending with [DONE]",
              body=CompletionRequest, answers={200: Completion}),
        route("POST", "/v1/chat/completions", generation(ChatCompletionRequest, serving.chat),
              "Answer a conversation rendered with the model's chat template (OpenAI-compatible); "
              "with stream: true, SSE chat.completion.chunk lines ending with [DONE]",
              body=ChatCompletionRequest, answers={200: ChatCompletion}),
        route("POST", "/v1/embeddings", generation(EmbeddingCreateRequest, serving.embeddings),
              "Embed one or more texts (OpenAI-compatible)", body=EmbeddingCreateRequest,
              answers={200: EmbeddingList}),
        route("GET", "/v1/models", list_models, "Models served by Ready pools (OpenAI-compatible)",
              answers={200: ModelList}, errors=(401,)),
        route("GET", "/v1/models/{model}", get_model, "One served model (OpenAI-compatible)",
              answers={200: ModelCard}, errors=(401, 404)),
    ]
