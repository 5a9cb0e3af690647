"""``POST /v1/embeddings``: the request body and the answer."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from orch.api.openai.common import unsupported

#: Texts one request may embed.
MAX_INPUTS = 1024


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
            raise unsupported("inputs given as token ids are not supported; send text")
        return value

    @field_validator("input")
    @classmethod
    def _inputs_present(cls, value: Union[str, list[str]]) -> Union[str, list[str]]:
        inputs = [value] if isinstance(value, str) else value
        if not inputs:
            raise ValueError("input must hold at least one string")
        if len(inputs) > MAX_INPUTS:
            raise ValueError(f"at most {MAX_INPUTS} inputs are accepted per request")
        if any(not text for text in inputs):
            raise ValueError("every input must be a non-empty string")
        return value

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


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
