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
from orch.api.sampling import MAX_TOP_LOGPROBS
from orch.api.tasks import MAX_TOKENS_CEILING

#: How a chat message is documented; the chat renderer checks it (orch.core.chat).
_MESSAGE_SCHEMA = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {
            "anyOf": [
                {"type": "null", "description": "only for an assistant message with tool_calls"},
                {"type": "string"},
                {"type": "array", "items": {
                    "type": "object", "required": ["type", "text"],
                    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                }},
            ]
        },
        "name": {"type": "string"},
        "tool_calls": {"type": "array", "description": "assistant messages: the calls made", "items": {
            "type": "object", "required": ["id", "function"],
            "properties": {"id": {"type": "string"}, "type": {"const": "function"},
                           "function": {"type": "object", "required": ["name", "arguments"],
                                        "properties": {"name": {"type": "string"},
                                                       "arguments": {"type": "string"}}}},
        }},
        "tool_call_id": {"type": "string", "description": "tool messages: the call this result answers"},
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
    logprobs: Optional[bool] = Field(default=None, description="each output token's logprob in choices[].logprobs")
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS,
                                        description="alternatives per token (needs logprobs: true)")
    tools: Optional[list[Any]] = Field(default=None, description="functions the model may call (orch.core.tools "
                                       "checks them; errors name the field)")
    functions: Optional[list[Any]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = Field(
        default=None, description="none, auto (the default with tools), required or {type: function, function: "
        "{name}}; required and a named function are constrained to valid arguments")
    function_call: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = Field(default=None, description="false: at most one call per turn")
    modalities: Optional[list[str]] = None
    audio: Optional[dict[str, Any]] = None
    prediction: Optional[dict[str, Any]] = None
    reasoning_effort: Optional[str] = None
    verbosity: Optional[str] = None
    web_search_options: Optional[dict[str, Any]] = None
    moderation: Optional[Any] = None

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @field_validator("functions")
    @classmethod
    def _no_functions(cls, value: Optional[list[Any]]) -> Optional[list[Any]]:
        if value:
            raise unsupported("functions (the legacy form) is not supported; send them as tools")
        return value

    @field_validator("function_call")
    @classmethod
    def _no_function_call(cls, value: Optional[Union[str, dict[str, Any]]]) -> Any:
        if value not in (None, "none", "auto"):
            raise unsupported("function_call (the legacy form) is not supported; send tool_choice")
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

    def alternatives(self) -> Optional[int]:
        """``GenerationParams.logprobs``: None without ``logprobs: true``."""
        return (self.top_logprobs or 0) if self.logprobs else None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    """``choices[].logprobs``: one entry per output token."""

    content: Optional[list[ChatTokenLogprob]] = None
    refusal: Optional[list[ChatTokenLogprob]] = None


class FunctionCall(BaseModel):
    name: str
    #: The arguments as a string of JSON.
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    """The answer: ``content`` (null when tool calls leave none) and ``tool_calls`` (left
    out when there are none)."""

    role: Literal["assistant"] = "assistant"
    content: Optional[str]
    tool_calls: Optional[list[ToolCall]] = None

    @model_serializer(mode="wrap")
    def _calls_when_made(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        body = handler(self)
        if body.get("tool_calls") is None:
            body.pop("tool_calls", None)
        return body


class _GivenOnly(BaseModel):
    """A streamed delta: fields left unset (None) are left out of the chunk, as OpenAI's are."""

    @model_serializer(mode="wrap")
    def _given_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class FunctionCallDelta(_GivenOnly):
    name: Optional[str] = None
    arguments: Optional[str] = None


class ToolCallDelta(_GivenOnly):
    """A call's first chunk has ``id``, ``type`` and ``function.name`` (arguments ""); later
    chunks of the same ``index`` add ``function.arguments`` text."""

    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: FunctionCallDelta


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: Optional[ChoiceLogprobs] = None
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


class ChatDelta(_GivenOnly):
    """What a chunk adds to the message: the role once, then content or tool calls; the
    last chunk's delta is empty."""

    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[list[ToolCallDelta]] = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: Optional[ChoiceLogprobs] = None
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
