"""OpenAI-compatible contract: request bodies, answers, stream chunks and the error shape,
one module per endpoint (``completions``, ``chat``, ``embeddings``, ``models``) over what
they share (``common``).

Which fields are accepted, on purpose:

- **Honoured**: ``model``, ``prompt`` / ``messages``, ``max_tokens`` (and
  ``max_completion_tokens`` for chat), ``temperature``, ``top_p``, ``seed``, ``stop`` (a
  string or up to ``MAX_STOP`` strings), ``stream``, ``stream_options.include_usage``,
  ``echo`` (completions), ``input`` / ``encoding_format`` / ``dimensions`` (embeddings,
  where ``dimensions`` must equal the model's own), and the common extensions ``top_k``,
  ``min_p``, ``repetition_penalty`` and ``ignore_eos`` (vLLM's benchmark client sends the last
  two with every request). ``top_p`` must be above 0, ``seed`` at least 0, ``min_p`` within
  [0, 1] and ``repetition_penalty`` above 0 (as in ``TaskRequest``).
- **Accepted at their no-op value only** (anything else is a 400 naming the field, code
  ``unsupported_parameter``): ``n`` and ``best_of`` (1), ``logprobs`` (null / false),
  ``top_logprobs`` (0), ``presence_penalty`` and ``frequency_penalty`` (0), ``logit_bias``
  (empty), ``suffix`` (empty), ``tools`` / ``functions`` (empty), ``tool_choice`` and
  ``function_call`` ("none" / "auto" with no tools), ``response_format`` (``text``),
  ``modalities`` (``["text"]``), ``audio``, ``prediction``, ``reasoning_effort``,
  ``verbosity``, ``web_search_options`` and ``moderation`` (null).
- **Accepted and ignored**, because they do not change the output: ``user``,
  ``safety_identifier``, ``metadata``, ``store`` (nothing is stored here either way),
  ``service_tier``, ``parallel_tool_calls``, ``prompt_cache_key``,
  ``prompt_cache_retention``, ``prompt_cache_options``, ``stream_options.include_obfuscation``.
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
    OpenAIErrorDetail,
    OpenAIErrorResponse,
    StreamOptions,
    Usage,
    error_type,
)
from orch.api.openai.completions import Completion, CompletionChoice, CompletionRequest
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
    "Completion",
    "CompletionChoice",
    "CompletionRequest",
    "DEFAULT_MAX_TOKENS",
    "ERROR_TYPES",
    "EmbeddingCreateRequest",
    "EmbeddingItem",
    "EmbeddingList",
    "EmbeddingUsage",
    "GenerationRequest",
    "MAX_STOP",
    "MODEL_NOT_FOUND",
    "ModelCard",
    "ModelList",
    "OWNED_BY",
    "OpenAIErrorDetail",
    "OpenAIErrorResponse",
    "StreamOptions",
    "UNKNOWN_PARAMETER",
    "UNSUPPORTED_PARAMETER",
    "Usage",
    "error_type",
]
