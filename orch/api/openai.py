"""OpenAI-compatible contract: request bodies, answers, stream chunks and the error shape.

Which fields are accepted, on purpose:

- **Honoured**: ``model``, ``prompt`` / ``messages``, ``max_tokens`` (and
  ``max_completion_tokens`` for chat), ``temperature``, ``top_p``, ``seed``, ``stop`` (a
  string or up to ``MAX_STOP`` strings), ``stream``, ``stream_options.include_usage``,
  ``echo`` (completions), ``input`` / ``encoding_format`` / ``dimensions`` (embeddings,
  where ``dimensions`` must equal the model's own), and the common extension ``top_k``.
  ``top_p`` must be above 0 and ``seed`` at least 0 (as in ``TaskRequest``).
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

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, WithJsonSchema, field_validator
from pydantic_core import PydanticCustomError

from orch.api.tasks import MAX_SEED, MAX_TOKENS_CEILING

#: Output tokens when the request names no limit (further bounded by the pool's limits).
DEFAULT_MAX_TOKENS = 256
#: Stop strings a request may give (the chat route may add the model's end-of-turn text).
MAX_STOP = 8
#: ``owned_by`` of every model listed.
OWNED_BY = "llama-orch"

#: Error ``type`` by HTTP status, as OpenAI clients expect it.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}
#: OpenAI-specific ``code`` values used next to the orchestrator's stable codes.
MODEL_NOT_FOUND = "model_not_found"
UNSUPPORTED_PARAMETER = "unsupported_parameter"
UNKNOWN_PARAMETER = "unknown_parameter"


def error_type(status: int) -> str:
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "server_error" if status >= 500 else "invalid_request_error"


# --------------------------------------------------------------------------- errors


class OpenAIErrorDetail(BaseModel):
    """What went wrong: ``code`` is the orchestrator's stable code (ADMISSION_REJECT,
    INVALID_PARAMS, POOL_UNREADY, ...) or an OpenAI one (model_not_found,
    unsupported_parameter, unknown_parameter); ``param`` names the offending field."""

    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None
    retriable: Optional[bool] = None
    retry_after_ms: Optional[int] = Field(default=None, ge=0)
    policy_label: Optional[str] = None
    pool_id: Optional[str] = None
    engine: Optional[str] = None
    correlation_id: Optional[str] = None


class OpenAIErrorResponse(BaseModel):
    """Body of every non-2xx answer of the /v1 routes, and of a stream's error chunk."""

    error: OpenAIErrorDetail


# --------------------------------------------------------------------------- requests


def _unsupported(message: str) -> PydanticCustomError:
    return PydanticCustomError(UNSUPPORTED_PARAMETER, message)


def _only_one(value: Optional[int], name: str) -> Optional[int]:
    if value not in (None, 1):
        raise _unsupported(f"{name} > 1 is not supported; this server returns one choice per request")
    return value


def _no_penalty(value: Optional[float], name: str) -> Optional[float]:
    if value not in (None, 0, 0.0):
        raise _unsupported(f"{name} is not supported; leave it out or set it to 0")
    return value


def _must_be_null(value: Any, what: str) -> Any:
    if value is not None:
        raise _unsupported(f"{what} is not supported by this server")
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    #: One more chunk before ``[DONE]``, with empty ``choices`` and the ``usage``.
    include_usage: Optional[bool] = None
    include_obfuscation: Optional[bool] = None


class _GenerationRequest(BaseModel):
    """Fields completions and chat share."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=2048)
    max_tokens: Optional[int] = Field(default=None, ge=1, le=MAX_TOKENS_CEILING)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=0, le=1000, description="Extension: top-k sampling (0: off)")
    seed: Optional[int] = Field(default=None, ge=0, le=MAX_SEED)
    stop: Optional[Union[str, list[str]]] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = Field(default=None, ge=1)
    presence_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = None
    # Accepted and ignored: they change nothing in the output.
    user: Optional[str] = Field(default=None, max_length=512)
    safety_identifier: Optional[str] = Field(default=None, max_length=512)
    metadata: Optional[dict[str, str]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    prompt_cache_retention: Optional[str] = None
    prompt_cache_options: Optional[dict[str, Any]] = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: Optional[Union[str, list[str]]]) -> Optional[Union[str, list[str]]]:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are accepted")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: Optional[int]) -> Optional[int]:
        return _only_one(value, "n")

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalties(cls, value: Optional[float], info: ValidationInfo) -> Optional[float]:
        return _no_penalty(value, info.field_name)

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
        if value:
            raise _unsupported("logit_bias is not supported; leave it out")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions`` body: one text prompt (or a list holding one)."""

    prompt: Union[str, list[str]] = Field(description="Text; a list must hold exactly one string")
    echo: Optional[bool] = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = Field(default=None, ge=1)
    suffix: Optional[str] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_text_prompt(cls, value: Any) -> Any:
        if isinstance(value, list):
            if any(not isinstance(item, str) for item in value):
                raise _unsupported("prompts given as token ids are not supported; send the text")
            if len(value) != 1:
                raise _unsupported("batched prompts are not supported; send one prompt per request")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value: Union[str, list[str]]) -> Union[str, list[str]]:
        text = value[0] if isinstance(value, list) else value
        if not text:
            raise ValueError("prompt must not be empty")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: Optional[int]) -> Optional[int]:
        return _must_be_null(value, "logprobs")

    @field_validator("best_of")
    @classmethod
    def _one_best(cls, value: Optional[int]) -> Optional[int]:
        return _only_one(value, "best_of")

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: Optional[str]) -> Optional[str]:
        if value:
            raise _unsupported("suffix (insertion) is not supported")
        return value

    def prompt_text(self) -> str:
        return self.prompt[0] if isinstance(self.prompt, list) else self.prompt


#: How a chat message is documented; the chat renderer checks it (orch.core.chat).
_MESSAGE_SCHEMA = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
        "content": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {
                    "type": "object", "required": ["type", "text"],
                    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                }},
            ]
        },
        "name": {"type": "string"},
    },
}

ChatMessages = Annotated[
    list[dict[str, Any]],
    WithJsonSchema({"type": "array", "minItems": 1, "items": _MESSAGE_SCHEMA}),
]


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions`` body; the messages are rendered with the model's own
    chat template."""

    messages: ChatMessages
    max_completion_tokens: Optional[int] = Field(default=None, ge=1, le=MAX_TOKENS_CEILING)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    tools: Optional[list[Any]] = None
    functions: Optional[list[Any]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    function_call: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[dict[str, Any]] = None
    modalities: Optional[list[str]] = None
    audio: Optional[dict[str, Any]] = None
    prediction: Optional[dict[str, Any]] = None
    reasoning_effort: Optional[str] = None
    verbosity: Optional[str] = None
    web_search_options: Optional[dict[str, Any]] = None
    moderation: Optional[Any] = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: Optional[bool]) -> Optional[bool]:
        if value:
            raise _unsupported("logprobs is not supported; leave it out or set it to false")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, value: Optional[int]) -> Optional[int]:
        if value:
            raise _unsupported("top_logprobs is not supported; leave it out or set it to 0")
        return value

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, value: Optional[list[Any]], info: ValidationInfo) -> Optional[list[Any]]:
        if value:
            raise _unsupported(f"{info.field_name} is not supported: this server does not do tool calling")
        return value

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, value: Optional[Union[str, dict[str, Any]]], info: ValidationInfo) -> Any:
        if value not in (None, "none", "auto"):
            raise _unsupported(f"{info.field_name} is not supported: this server does not do tool calling")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        if value is not None and value.get("type") != "text":
            raise _unsupported(f"response_format type {value.get('type')!r} is not supported; only 'text' is")
        return value

    @field_validator("modalities")
    @classmethod
    def _text_modality(cls, value: Optional[list[str]]) -> Optional[list[str]]:
        if value is not None and value != ["text"]:
            raise _unsupported("only the 'text' modality is supported")
        return value

    @field_validator("audio", "prediction", "reasoning_effort", "verbosity", "web_search_options", "moderation")
    @classmethod
    def _not_offered(cls, value: Any, info: ValidationInfo) -> Any:
        return _must_be_null(value, info.field_name)

    @field_validator("max_completion_tokens")
    @classmethod
    def _one_limit(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        older = info.data.get("max_tokens")
        if value is not None and older is not None and value != older:
            raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        return value

    def output_limit(self) -> Optional[int]:
        """``max_completion_tokens`` (the current name) or ``max_tokens`` (the older one)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class EmbeddingCreateRequest(BaseModel):
    """``POST /v1/embeddings`` body: one string or a list of strings."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=2048)
    input: Union[str, list[str]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(default=None, ge=1)
    user: Optional[str] = Field(default=None, max_length=512)

    @field_validator("input", mode="before")
    @classmethod
    def _text_inputs(cls, value: Any) -> Any:
        if isinstance(value, list) and any(not isinstance(item, str) for item in value):
            raise _unsupported("inputs given as token ids are not supported; send text")
        return value

    @field_validator("input")
    @classmethod
    def _inputs_present(cls, value: Union[str, list[str]]) -> Union[str, list[str]]:
        inputs = [value] if isinstance(value, str) else value
        if not inputs:
            raise ValueError("input must hold at least one string")
        if len(inputs) > 1024:
            raise ValueError("at most 1024 inputs are accepted per request")
        if any(not text for text in inputs):
            raise ValueError("every input must be a non-empty string")
        return value

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


# --------------------------------------------------------------------------- answers


class Usage(BaseModel):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: None = None
    #: stop, length, or cancelled (an operator cancelled or drained the task).
    finish_reason: Optional[str] = None


class Completion(BaseModel):
    """A text completion; streamed, each chunk has this shape with a piece of the text
    (``usage`` only on the last chunk, when ``stream_options.include_usage``)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: Optional[str] = None
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Optional[str] = None


class ChatCompletion(BaseModel):
    """A chat completion (``stream: false``)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: Optional[str] = None
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: Optional[str] = None


class ChatCompletionChunk(BaseModel):
    """One ``data:`` line of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: Optional[str] = None
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    #: Floats, or with ``encoding_format: base64`` the little-endian float32 bytes in base64.
    embedding: Union[list[float], str]


class EmbeddingUsage(BaseModel):
    prompt_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class EmbeddingList(BaseModel):
    """``POST /v1/embeddings`` answer: one normalised vector per input, in input order."""

    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    """A model a Ready pool serves; ``id`` is what requests name in ``model``."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = OWNED_BY


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
