"""``POST /v1/completions``: the request body, the answer and its stream chunks."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, Field, field_validator

from orch.api.openai.common import GenerationRequest, Usage, must_be_null, only_one, unsupported


class CompletionRequest(GenerationRequest):
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
                raise unsupported("prompts given as token ids are not supported; send the text")
            if len(value) != 1:
                raise unsupported("batched prompts are not supported; send one prompt per request")
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
        return must_be_null(value, "logprobs")

    @field_validator("best_of")
    @classmethod
    def _one_best(cls, value: Optional[int]) -> Optional[int]:
        return only_one(value, "best_of")

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: Optional[str]) -> Optional[str]:
        if value:
            raise unsupported("suffix (insertion) is not supported")
        return value

    def prompt_text(self) -> str:
        return self.prompt[0] if isinstance(self.prompt, list) else self.prompt


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
