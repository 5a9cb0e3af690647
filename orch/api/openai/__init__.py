"""OpenAI-compatible contract: request bodies, answers, stream chunks and the error shape,
one module per endpoint (``completions``, ``chat``, ``embeddings``, ``models``) over what
they share (``common``).

Which fields are accepted, on purpose:

- **Honoured**: ``model``, ``prompt`` / ``messages``, ``max_tokens`` (and
  ``max_completion_tokens`` for chat; 0 on completions only with ``echo``), ``temperature``,
  ``top_p``, ``seed``, ``stop`` (a string or up to ``MAX_STOP`` strings), ``stream``,
  ``stream_options.include_usage``, ``n`` (1-8: one task per choice, on one pool, seeded
  ``seed + index``), ``presence_penalty`` / ``frequency_penalty`` ([-2, 2]), ``logit_bias``
  (token id -> [-100, 100]), ``logprobs`` (completions: 0-5 alternatives; chat: true, with
  ``top_logprobs`` 0-20), ``echo`` (completions; with ``logprobs``, the prompt's tokens are
  scored too, the first with a null logprob), ``response_format`` (``text``, ``json_object``,
  ``json_schema`` checked against the JSON Schema meta-schema), ``input`` /
  ``encoding_format`` / ``dimensions`` (embeddings, where ``dimensions`` must equal the
  model's own), and the common extensions ``top_k``, ``min_p``, ``typical_p``,
  ``repetition_penalty``, ``min_tokens`` and ``ignore_eos`` (vLLM's benchmark client sends
  ``repetition_penalty`` and ``ignore_eos`` with every request). A parameter the serving
  pool's engine cannot honour is a 400 naming it and the engine (``orch.core.engine_features``).
- **Recorded, output unchanged**: ``user`` (in the logs and the transcript, never a metric label).
- **Accepted at their no-op value only** (anything else is a 400 naming the field, code
  ``unsupported_parameter``): ``best_of`` (1), ``suffix`` (empty), ``functions`` (empty),
  ``function_call`` ("none" / "auto"), ``modalities`` (``["text"]``), ``audio``,
  ``prediction``, ``reasoning_effort``, ``verbosity``, ``web_search_options`` and
  ``moderation`` (null).
- **Accepted and ignored**, because they do not change the output: ``safety_identifier``,
  ``metadata``, ``store`` (nothing is stored here either way), ``service_tier``,
  ``prompt_cache_key``, ``prompt_cache_retention``, ``prompt_cache_options``,
  ``stream_options.include_obfuscation``.
- **Anything else** is refused (code ``unknown_parameter``), as the v2 API does, so a typo
  never silently changes behaviour.

Omitted sampling fields take the orchestrator's defaults (``TaskRequest``: temperature 0.8,
top_p 0.95, top_k 40), not OpenAI's 1.0; an omitted ``max_tokens`` is ``DEFAULT_MAX_TOKENS``
bounded by the pool's limits.
"""

from orch.api.openai.chat import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatTokenLogprob,
    ChoiceLogprobs,
    TopLogprob,
)
from orch.api.openai.common import (
    DEFAULT_MAX_TOKENS,
    ERROR_TYPES,
    MAX_STOP,
    MODEL_NOT_FOUND,
    OWNED_BY,
    UNKNOWN_PARAMETER,
    UNSUPPORTED_PARAMETER,
    GenerationRequest,
    JsonSchemaFormat,
    OpenAIErrorDetail,
    OpenAIErrorResponse,
    ResponseFormat,
    StreamOptions,
    Usage,
    error_type,
)
from orch.api.openai.completions import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest
from orch.api.openai.embeddings import EmbeddingCreateRequest, EmbeddingItem, EmbeddingList, EmbeddingUsage
from orch.api.openai.models import ModelCard, ModelList

__all__ = [
    "AssistantMessage",
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatDelta",
    "ChatTokenLogprob",
    "ChoiceLogprobs",
    "Completion",
    "CompletionChoice",
    "CompletionLogprobs",
    "CompletionRequest",
    "DEFAULT_MAX_TOKENS",
    "ERROR_TYPES",
    "EmbeddingCreateRequest",
    "EmbeddingItem",
    "EmbeddingList",
    "EmbeddingUsage",
    "GenerationRequest",
    "JsonSchemaFormat",
    "MAX_STOP",
    "MODEL_NOT_FOUND",
    "ModelCard",
    "ModelList",
    "OWNED_BY",
    "OpenAIErrorDetail",
    "OpenAIErrorResponse",
    "ResponseFormat",
    "StreamOptions",
    "TopLogprob",
    "UNKNOWN_PARAMETER",
    "UNSUPPORTED_PARAMETER",
    "Usage",
    "error_type",
]
