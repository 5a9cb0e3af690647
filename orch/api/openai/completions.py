"""``POST /v1/completions``: the request body, the answer and its stream chunks."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, Field, field_validator, model_validator

from orch.api.openai.common import GenerationRequest, Usage, only_one, unsupported
from orch.api.sampling import MAX_COMPLETION_LOGPROBS
from orch.api.tasks import MAX_TOKENS_CEILING


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions`` body: one text prompt (or a list holding one)."""

    prompt: Union[str, list[str]] = Field(description="Text; a list must hold exactly one string")
    max_tokens: Optional[int] = Field(default=None, ge=0, le=MAX_TOKENS_CEILING,
                                      description="0 only with echo: the prompt scored, nothing generated")
    echo: Optional[bool] = False
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS,
                                    description="each token's logprob and this many alternatives")
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

    @model_validator(mode="after")
    def _nothing_to_generate(self) -> "CompletionRequest":
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 generates nothing: it needs echo (to return the prompt and its logprobs)")
        return self

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


class CompletionLogprobs(BaseModel):
    """Per token of ``text``: the token, its logprob (null for a prompt's first token), the
    likeliest alternatives and where the token starts in ``text``."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: Optional[CompletionLogprobs] = None
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
