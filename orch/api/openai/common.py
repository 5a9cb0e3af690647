"""What the OpenAI-compatible endpoints share: limits, the error shape, sampling fields and
usage."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from orch.api.preparation import Preparation
from orch.api.sampling import JSON_OBJECT_SCHEMA, MAX_CHOICES, logit_bias_pairs, schema_text
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

#: Detail fields OpenAI clients expect on every error, null when none applies.
_ALWAYS_SENT = frozenset({"message", "type", "param", "code"})


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
    preparation: Optional[Preparation] = Field(
        default=None, description="POOL_UNREADY for a model that is not present: what would make it present")

    @model_serializer(mode="wrap")
    def _known_details(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        """The orchestrator's details only where known; the preparation as the pool gave it."""
        body = {key: value for key, value in handler(self).items() if value is not None or key in _ALWAYS_SENT}
        if self.preparation is not None:
            body["preparation"] = self.preparation.model_dump(mode=info.mode, exclude_unset=True)
        return body


class OpenAIErrorResponse(BaseModel):
    """Body of every non-2xx answer of the /v1 routes, and of a stream's error chunk."""

    error: OpenAIErrorDetail


# --------------------------------------------------------------------------- requests


def unsupported(message: str) -> PydanticCustomError:
    """A validation error whose type becomes the OpenAI code ``unsupported_parameter``."""
    return PydanticCustomError(UNSUPPORTED_PARAMETER, message)


def only_one(value: Optional[int], name: str) -> Optional[int]:
    if value not in (None, 1):
        raise unsupported(f"{name} > 1 is not supported; this server returns one choice per request")
    return value


def must_be_null(value: Any, what: str) -> Any:
    if value is not None:
        raise unsupported(f"{what} is not supported by this server")
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    #: One more chunk before ``[DONE]``, with empty ``choices`` and the ``usage``.
    include_usage: Optional[bool] = None
    include_obfuscation: Optional[bool] = None


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: the schema the output must validate against."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(default="response", min_length=1, max_length=64)
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None

    @field_validator("schema_")
    @classmethod
    def _a_schema(cls, value: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        """Checked against the JSON Schema meta-schema before any engine sees it."""
        schema_text(value)
        return value


class ResponseFormat(BaseModel):
    """``text`` (no constraint), ``json_object`` (any JSON object) or ``json_schema``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs json_schema: {name, schema}")
        return self

    def schema_text(self) -> Optional[str]:
        """The JSON Schema the output is constrained to, as JSON text; None for ``text``."""
        if self.type == "json_object":
            return schema_text(JSON_OBJECT_SCHEMA)
        if self.type == "json_schema" and self.json_schema is not None:
            return schema_text(self.json_schema.schema_ if self.json_schema.schema_ is not None
                               else JSON_OBJECT_SCHEMA)
        return None


class GenerationRequest(BaseModel):
    """Fields completions and chat share."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=2048)
    max_tokens: Optional[int] = Field(default=None, ge=1, le=MAX_TOKENS_CEILING)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=0, le=1000, description="Extension: top-k sampling (0: off)")
    min_p: Optional[float] = Field(default=None, ge=0.0, le=1.0, description="Extension: min-p sampling (0: off)")
    repetition_penalty: Optional[float] = Field(default=None, gt=0.0, allow_inf_nan=False,
                                                description="Extension (vLLM): penalty on tokens already seen (1: off)")
    ignore_eos: Optional[bool] = Field(default=None, description="Extension (vLLM): generate to max_tokens")
    seed: Optional[int] = Field(default=None, ge=0, le=MAX_SEED)
    stop: Optional[Union[str, list[str]]] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = Field(default=None, ge=1, le=MAX_CHOICES, description="choices, each its own sequence")
    presence_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, Any]] = Field(default=None, description="token id -> bias in [-100, 100]")
    typical_p: Optional[float] = Field(default=None, gt=0.0, le=1.0, description="Extension: locally typical "
                                       "sampling (1: off)")
    min_tokens: Optional[int] = Field(default=None, ge=0, le=MAX_TOKENS_CEILING,
                                      description="Extension (vLLM): no end of generation before this many tokens")
    response_format: Optional[ResponseFormat] = None
    #: Recorded in the logs (never a metric label); changes nothing in the output.
    user: Optional[str] = Field(default=None, max_length=512)
    # Accepted and ignored: they change nothing in the output.
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

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        logit_bias_pairs(value)
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def choices(self) -> int:
        return self.n or 1

    def json_schema(self) -> Optional[str]:
        return self.response_format.schema_text() if self.response_format is not None else None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def output_limit(self) -> Optional[int]:
        """The output token limit the request names, if any."""
        return self.max_tokens


# --------------------------------------------------------------------------- answers


class Usage(BaseModel):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)
