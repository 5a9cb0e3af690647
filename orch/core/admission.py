"""Admission guardrails, checked before anything is queued.

Two stages, both pure: ``check_request`` runs in the ingress against the limits the pool
advertises (no tokenizer needed), ``check_context`` runs where the tokenizer lives, with
the exact prompt token count, just before the task is queued.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from orch.api.errors import ErrorCode
from orch.api.tasks import TaskRequest
from orch.core.errors import OrchError


@dataclass(frozen=True)
class ModelLimits:
    ctx_max: int
    max_tokens_out: Optional[int] = None


def check_request(request: TaskRequest, limits: ModelLimits) -> int:
    """Validate the request against the model's limits; returns the context to use."""
    ctx = request.ctx if request.ctx is not None else limits.ctx_max
    if ctx > limits.ctx_max:
        raise OrchError(
            ErrorCode.INVALID_PARAMS,
            f"ctx {ctx} exceeds the model's maximum context of {limits.ctx_max} tokens; "
            f"ask for ctx <= {limits.ctx_max} or leave it out",
        )
    if request.max_tokens >= ctx:
        raise OrchError(
            ErrorCode.INVALID_PARAMS,
            f"max_tokens {request.max_tokens} leaves no room for the prompt in a context of "
            f"{ctx} tokens; lower max_tokens below {ctx}",
        )
    if limits.max_tokens_out is not None and request.max_tokens > limits.max_tokens_out:
        raise OrchError(
            ErrorCode.INVALID_PARAMS,
            f"max_tokens {request.max_tokens} exceeds this pool's limit of "
            f"{limits.max_tokens_out} output tokens",
        )
    return ctx


def check_context(prompt_tokens: int, max_tokens: int, ctx: int) -> None:
    """The prompt plus every token it may generate must fit the context."""
    if prompt_tokens + max_tokens > ctx:
        raise OrchError(
            ErrorCode.INVALID_PARAMS,
            f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = "
            f"{prompt_tokens + max_tokens} exceeds the context of {ctx} tokens; "
            "shorten the prompt or lower max_tokens",
        )
