"""Which request parameters each engine honours: a request that sets one its pool's engine
cannot honour is refused with a typed 400 naming the parameter and the engine, never run
with the parameter dropped.

Parameters are named as on ``POST /v2/tasks`` (``TaskRequest``); the ``/v1`` routes map
theirs onto these (``response_format`` is ``json_schema``, ``echo`` with ``logprobs`` is
``prompt_logprobs``). A parameter at its "off" value (a penalty of 0, ``typical_p`` 1, an
empty ``logit_bias``) is not a request for it. Pure: no engine is imported.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from orch.api.errors import ErrorCode
from orch.api.tasks import TaskRequest
from orch.core.errors import OrchError

#: What every engine has honoured from the start.
BASE = ("temperature", "top_p", "top_k", "seed", "stop", "min_p", "repetition_penalty", "ignore_eos", "n")
#: The rest, each honoured only where the table says so.
EXTENDED = ("presence_penalty", "frequency_penalty", "typical_p", "logit_bias", "min_tokens", "logprobs",
            "prompt_logprobs", "json_schema", "grammar")
ALL = BASE + EXTENDED
UNBATCHED_LLAMACPP = "llamacpp (batching: false)"

#: Engine name -> the parameters it honours. llama.cpp implements every one in its sampler;
#: vLLM has no locally typical sampling; an external server gets each one passed through
#: (and refuses, as a 400 of the task, what it does not take); the mock engine is for fault
#: injection and benchmarks and shapes no output.
ENGINE_PARAMETERS: dict[str, frozenset[str]] = {
    "llamacpp": frozenset(ALL),
    #: The one-sequence-per-slot llama.cpp engine (``engine_options: {batching: false}``).
    UNBATCHED_LLAMACPP: frozenset(ALL) - {"logprobs", "prompt_logprobs", "min_tokens"},
    "vllm": frozenset(ALL) - {"typical_p"},
    "external": frozenset(ALL),
    "mock": frozenset(BASE),
}

#: The value of each extended parameter that asks for nothing.
_OFF: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (None, 0.0),
    "frequency_penalty": (None, 0.0),
    "typical_p": (None, 1.0),
    "logit_bias": (None, {}),
    "min_tokens": (None, 0),
    "logprobs": (None,),
    "prompt_logprobs": (None,),
    "json_schema": (None,),
    "grammar": (None,),
}


def variant(engine: str, engine_options: Optional[dict[str, Any]] = None) -> str:
    """The table's row for a pool: its engine, told apart by the options that change what it honours."""
    if engine == "llamacpp" and (engine_options or {}).get("batching") is False:
        return UNBATCHED_LLAMACPP
    return engine


def supported(engine: str) -> frozenset[str]:
    """The parameters ``engine`` honours (an unknown engine: the base ones)."""
    return ENGINE_PARAMETERS.get(engine, frozenset(BASE))


def requested(request: TaskRequest) -> list[str]:
    """The extended parameters the request asks for, in ``EXTENDED`` order."""
    return [name for name in EXTENDED if getattr(request, name) not in _OFF[name]]


def unsupported(engine: str, wanted: Iterable[str]) -> list[str]:
    have = supported(engine)
    return [name for name in wanted if name not in have]


def refusal(engine: str, parameter: str, pool_id: Optional[str] = None, shown_as: Optional[str] = None) -> OrchError:
    """The 400 for a parameter the engine cannot honour; ``shown_as`` is the request's own
    name for it (a /v1 field)."""
    where = f" (pool '{pool_id}')" if pool_id else ""
    return OrchError(ErrorCode.INVALID_PARAMS,
                     f"{shown_as or parameter} is not supported by engine '{engine}'{where}; leave it out, or send the "
                     "request to a model served by an engine that supports it (GET /v2/meta/capabilities lists "
                     "each pool's parameters)", engine=engine, pool_id=pool_id)


def check(engine: str, request: TaskRequest, pool_id: Optional[str] = None) -> None:
    """Raise the typed 400 for the first parameter of ``request`` that ``engine`` cannot honour."""
    missing = unsupported(engine, requested(request))
    if missing:
        raise refusal(engine, missing[0], pool_id)
