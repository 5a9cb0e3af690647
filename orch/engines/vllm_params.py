"""The pool's ``GenerationParams`` as vLLM's ``SamplingParams``, and vLLM's outputs as the
pieces ``emit`` takes (exact token counts, logprobs when asked).

vLLM imports lazily: this module is read where vLLM is installed only when it is used.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

from orch.api.errors import ErrorCode
from orch.engines.base import EngineError, GenerationParams, Piece, TokenLogprob

#: The processor that applies top_p to the top_k survivors, and the extra_args key it reads
#: (orch/engines/vllm_topp.py; named here so that only vLLM's engine process imports it).
TOP_P_PROCESSOR = "orch.engines.vllm_topp:TopPAmongTopK"
TOP_P_ARG = "orch_top_p"

#: vLLM seeds a torch generator per request, which takes a signed 64-bit seed; request
#: seeds are already in [0, 2**63), and anything wider is folded by modulo.
SEED_MODULUS = 2**63


def sampling_params(params: GenerationParams, end_tokens: Sequence[int] = ()):
    """vLLM's ``SamplingParams`` for one request (DELTA outputs: each output holds only what is new).

    ``max_tokens`` 0 (the prompt scored, nothing generated) runs one token that is never
    emitted: vLLM generates at least one. ``ignore_eos`` also bans the end tokens, so the
    answer holds ``max_tokens`` tokens of text."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    if params.typical_p not in (None, 1.0):
        raise EngineError("engine vllm does not do locally typical sampling (typical_p); leave it out",
                          code=ErrorCode.INVALID_PARAMS)
    optional: dict[str, Any] = {name: getattr(params, name) for name in (
        "repetition_penalty", "min_p", "presence_penalty", "frequency_penalty", "logprobs", "prompt_logprobs")
        if getattr(params, name) is not None}  # None: vLLM's own default
    bias = dict(params.logit_bias)
    if params.ignore_eos:
        bias.update({token: -100.0 for token in end_tokens})
    if bias:
        optional["logit_bias"] = bias
    if params.min_tokens:
        optional["min_tokens"] = params.min_tokens
    top_p = params.top_p
    if params.top_k and params.top_k > 0 and top_p is not None and top_p < 1.0:
        # Applied to the top_k survivors by orch/engines/vllm_topp.py, not by vLLM's
        # full-vocabulary sort.
        optional["extra_args"] = {TOP_P_ARG: top_p}
        top_p = 1.0
    if params.json_schema is not None:
        optional["structured_outputs"] = StructuredOutputsParams(json=json.loads(params.json_schema))
    elif params.grammar is not None:
        optional["structured_outputs"] = StructuredOutputsParams(grammar=params.grammar)
    return SamplingParams(
        max_tokens=max(1, params.max_tokens),
        temperature=params.temperature,
        top_p=top_p,
        top_k=params.top_k,
        seed=params.seed % SEED_MODULUS,
        stop=list(params.stop) or None,
        ignore_eos=params.ignore_eos,
        output_kind=RequestOutputKind.DELTA,
        **optional,
    )


def output_pieces(output: Any, params: GenerationParams, prompt: str, tokenizer: Any,
                  prompt_due: bool) -> list[Any]:
    """What one DELTA output of vLLM gives ``emit``: the prompt's logprobs first (once, when
    asked), then the new text with its token count (a plain str for one token without logprobs)."""
    pieces: list[Any] = []
    if prompt_due and output.prompt_logprobs:
        pieces.append(Piece(prompt, tokens=len(output.prompt_token_ids or ()), prompt=True, logprobs=tuple(
            _prompt_logprobs(output.prompt_token_ids, output.prompt_logprobs, params.prompt_logprobs or 0, tokenizer))))
    if params.max_tokens == 0:
        return pieces
    completion = output.outputs[0]
    tokens = len(completion.token_ids)
    if not tokens and not completion.text:
        return pieces
    if params.logprobs is None:
        pieces.append(completion.text if tokens == 1 else Piece(completion.text, tokens=tokens))
        return pieces
    entries = list(completion.logprobs or ())[-tokens:] if tokens else []
    logprobs = tuple(_token_logprob(token, entry, params.logprobs, tokenizer)
                     for token, entry in zip(completion.token_ids, entries))
    pieces.append(Piece(completion.text, tokens=tokens, logprobs=logprobs))
    return pieces


def _prompt_logprobs(token_ids: Sequence[int], positions: Sequence[Optional[dict]], top: int,
                     tokenizer: Any) -> list[TokenLogprob]:
    out = []
    for index, token in enumerate(token_ids):
        entry = positions[index] if index < len(positions) else None
        if not entry:  # the first token: nothing predicts it
            text = tokenizer.decode([token])
            out.append(TokenLogprob(token=text, logprob=None, bytes=tuple(text.encode("utf-8"))))
        else:
            out.append(_token_logprob(token, entry, top, tokenizer))
    return out


def _token_logprob(token: int, entry: Optional[dict], top: int, tokenizer: Any) -> TokenLogprob:
    """One position of vLLM's logprobs ({token id: Logprob}, the chosen token and the top ones)."""
    entry = entry or {}
    chosen = entry.get(token)
    text = _text(token, chosen, tokenizer)
    ranked = sorted(entry.items(), key=lambda item: -item[1].logprob)[:top] if top else []
    return TokenLogprob(token=text, logprob=chosen.logprob if chosen is not None else float("-inf"),
                        bytes=tuple(text.encode("utf-8")),
                        top=tuple((_text(alt, logprob, tokenizer), logprob.logprob) for alt, logprob in ranked))


def _text(token: int, logprob: Any, tokenizer: Any) -> str:
    decoded = getattr(logprob, "decoded_token", None)
    return decoded if decoded is not None else tokenizer.decode([token])
