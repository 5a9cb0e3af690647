"""One sequence of the batched llama.cpp engine: its sampler chain, text and stop state.

The sampler chain is the one llama-cpp-python's ``Llama`` builds for a completion (penalties,
top-k, typical, top-p, min-p, temperature, then a seeded draw; greedy at temperature 0), so
a request samples the same way in both engines, with a logit bias first. A grammar
(``json_schema``, ``grammar``) is a second sampler, applied as llama.cpp's own sampler does
(``Logits.sample_constrained``). Each sequence owns its samplers: the seeded generator, the
penalty history (generated tokens) and the grammar's state advance only with its tokens.
"""

from __future__ import annotations

import codecs
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from orch.api.events import FinishReason
from orch.engines.base import EngineError, GenerationParams, Piece, TokenLogprob

#: llama.cpp seeds are 32-bit; wider request seeds are folded by modulo.
SEED_MODULUS = 2**32
#: Defaults of llama-cpp-python's completion for what the pool's parameters do not carry.
DEFAULT_MIN_P = 0.05
PENALTY_LAST_N = 64


@dataclass(frozen=True)
class End:
    """The last item a sequence delivers: why it stopped, or the failure."""

    finish: FinishReason
    error: Optional[EngineError] = None


def sampler_chain(llama_cpp: Any, params: GenerationParams, n_vocab: int, banned: tuple[int, ...] = ()) -> Any:
    """A llama.cpp sampler chain for ``params``; ``banned`` tokens (end of generation under
    ``ignore_eos``) get a -inf bias. Freed with ``llama_sampler_free``."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())

    def add(sampler: Any) -> None:
        llama_cpp.llama_sampler_chain_add(chain, sampler)

    biases = dict(getattr(params, "logit_bias", None) or ())
    biases.update((token, float("-inf")) for token in banned)
    if biases:
        array = (llama_cpp.llama_logit_bias * len(biases))()
        for index, (token, bias) in enumerate(biases.items()):
            array[index].token = token
            array[index].bias = float(bias)
        add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(biases), array))
    add(llama_cpp.llama_sampler_init_penalties(
        n_vocab, PENALTY_LAST_N, _param(params, "repetition_penalty", 1.0), _param(params, "frequency_penalty", 0.0),
        _param(params, "presence_penalty", 0.0)))
    if params.temperature <= 0.0:
        add(llama_cpp.llama_sampler_init_greedy())
        return chain
    add(llama_cpp.llama_sampler_init_top_k(params.top_k))
    add(llama_cpp.llama_sampler_init_typical(_param(params, "typical_p", 1.0), 1))
    add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
    add(llama_cpp.llama_sampler_init_min_p(_param(params, "min_p", DEFAULT_MIN_P), 1))
    add(llama_cpp.llama_sampler_init_temp(params.temperature))
    add(llama_cpp.llama_sampler_init_dist(params.seed % SEED_MODULUS))
    return chain


def _param(params: GenerationParams, name: str, default: float) -> float:
    """A sampling parameter the request may carry (None or absent: llama-cpp-python's default)."""
    value = getattr(params, name, None)
    return default if value is None else float(value)


class TextStream:
    """Token bytes to text: holds back an unfinished UTF-8 character and any tail that may be
    the start of a stop string, and cuts the text where a stop string begins."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop = tuple(s for s in stop if s)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self._held = ""

    def push(self, piece: bytes, stops: bool = True) -> tuple[str, bool]:
        """Text that may leave now, and whether a stop string ended the generation (never
        while ``stops`` is False: before ``min_tokens``)."""
        held = self._held + self._decoder.decode(piece)
        if not stops:
            self._held = ""
            return held, False
        cuts = [index for index in (held.find(s) for s in self.stop) if index >= 0]
        if cuts:
            self._held = ""
            return held[:min(cuts)], True
        keep = 0
        for s in self.stop:
            for length in range(min(len(s) - 1, len(held)), keep, -1):
                if held.endswith(s[:length]):
                    keep = length
                    break
        self._held = held[len(held) - keep:] if keep else ""
        return held[:len(held) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held + self._decoder.decode(b"", final=True)


@dataclass(eq=False)
class Sequence:
    """A request inside the batched engine. The scheduler thread owns every field but
    ``cancelled``, which any thread may set to stop it at the next step."""

    prompt: str
    params: GenerationParams
    #: Receives each text piece, then one ``End``; called on the scheduler thread.
    deliver: Callable[[Any], None]
    #: Run alone in a cleared cache (``determinism: strict``): same text whatever else runs.
    alone: bool = False
    tokens: list[int] = field(default_factory=list)
    seq_id: int = -1
    #: Tokens of ``tokens`` whose keys and values are in the cache (positions 0..n_past-1).
    n_past: int = 0
    generated: int = 0
    #: The token sampled last, fed at the next step; None while the prompt is read.
    next_token: Optional[int] = None
    sampler: Any = None
    #: The grammar sampler (``grammar``), kept out of ``sampler`` so that most tokens skip it.
    grammar_sampler: Any = None
    stream: Optional[TextStream] = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    #: GBNF the output must match (``grammar``, or ``json_schema`` converted), checked at submit.
    grammar: Optional[str] = None
    #: Output tokens (and their logprobs, when asked) not yet delivered: held-back text waits.
    unsent: int = 0
    unsent_logprobs: list[TokenLogprob] = field(default_factory=list)
    #: The prompt's tokens with their logprobs (``prompt_logprobs``), filled as the prompt is read.
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    #: What the cache's cells of this sequence stand for, as text (the engine's cache report):
    #: where each prompt token ends in the prompt's UTF-8 bytes, then the bytes of the output
    #: tokens fed back and where each ends.
    prompt_bytes: bytes = b""
    #: When the sequence took its id (later ones report first).
    start_order: int = 0
    token_ends: list[int] = field(default_factory=list)
    output: bytearray = field(default_factory=bytearray)
    output_ends: list[int] = field(default_factory=list)

    def held_text(self, cells: int) -> bytes:
        """The text of this sequence's first ``cells`` tokens: the prompt as far as they spell
        it, then, once it is whole, the output fed back (any thread: only ever appended to)."""
        prompt_cells = min(cells, len(self.token_ends))
        end = self.token_ends[prompt_cells - 1] if prompt_cells else 0
        if cells <= len(self.tokens) or end < len(self.prompt_bytes) or len(self.token_ends) < len(self.tokens):
            return self.prompt_bytes[:end]
        fed = min(cells - len(self.tokens), len(self.output_ends))
        return self.prompt_bytes + bytes(self.output[:self.output_ends[fed - 1] if fed else 0])

    @property
    def prefilling(self) -> bool:
        return self.next_token is None

    @property
    def wants_prompt_logprobs(self) -> bool:
        return getattr(self.params, "prompt_logprobs", None) is not None

    def take(self, text: str, prompt: bool = False) -> Any:
        """What the next ``deliver`` carries for ``text``: a bare str for one token without
        logprobs, else a Piece with the exact token count and the logprobs."""
        if prompt:
            logprobs, self.prompt_logprobs = self.prompt_logprobs, []
            return Piece(text, len(logprobs), tuple(logprobs), prompt=True)
        count, logprobs = self.unsent, self.unsent_logprobs
        self.unsent, self.unsent_logprobs = 0, []
        if count == 1 and not logprobs:
            return text
        return Piece(text, count, tuple(logprobs))
