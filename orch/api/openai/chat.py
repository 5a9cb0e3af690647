"""``POST /v1/chat/completions``: the request body, the answer and its stream chunks."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    BaseModel,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_serializer,
)

from orch.api.openai.common import GenerationRequest, Usage, must_be_null, unsupported
from orch.api.tasks import MAX_TOKENS_CEILING

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


class ChatCompletionRequest(GenerationRequest):
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
            raise unsupported("logprobs is not supported; leave it out or set it to false")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, value: Optional[int]) -> Optional[int]:
        if value:
            raise unsupported("top_logprobs is not supported; leave it out or set it to 0")
        return value

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, value: Optional[list[Any]], info: ValidationInfo) -> Optional[list[Any]]:
        if value:
            raise unsupported(f"{info.field_name} is not supported: this server does not do tool calling")
        return value

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, value: Optional[Union[str, dict[str, Any]]], info: ValidationInfo) -> Any:
        if value not in (None, "none", "auto"):
            raise unsupported(f"{info.field_name} is not supported: this server does not do tool calling")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        if value is not None and value.get("type") != "text":
            raise unsupported(f"response_format type {value.get('type')!r} is not supported; only 'text' is")
        return value

    @field_validator("modalities")
    @classmethod
    def _text_modality(cls, value: Optional[list[str]]) -> Optional[list[str]]:
        if value is not None and value != ["text"]:
            raise unsupported("only the 'text' modality is supported")
        return value

    @field_validator("audio", "prediction", "reasoning_effort", "verbosity", "web_search_options", "moderation")
    @classmethod
    def _not_offered(cls, value: Any, info: ValidationInfo) -> Any:
        return must_be_null(value, info.field_name)

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
    """What a chunk adds to the message: the role once, then content; the last chunk's
    delta is empty."""

    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None

    @model_serializer(mode="wrap")
    def _given_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


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
