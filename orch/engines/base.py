"""Engine interface: what a pool actor needs from an inference engine.

An engine runs one generation per slot at a time, in one of two ways: ``generate`` is
synchronous and runs in a slot thread of the pool actor (llama.cpp, the mock, an external
server), and an engine with ``generates_on_loop`` (vLLM, batched llama.cpp) instead has
``generate_async`` awaited on the actor's event loop, without slot threads. Either way tokens leave through
``emit``; returning False from it stops generation (cancel, deadline), which is how
cancellation reaches the engine without polling.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

from orch.api.events import FinishReason
from orch.core.prefix import Resident


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and, when asked, its likeliest alternatives."""

    #: The token's text (an unfinished UTF-8 character decodes with replacement).
    token: str
    #: None for a prompt's first token, which nothing predicts.
    logprob: Optional[float]
    #: The token's raw bytes, for clients that join multi-byte characters themselves.
    bytes: tuple[int, ...] = ()
    #: (token text, logprob) of the likeliest tokens at this position, likeliest first.
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Piece:
    """Text one ``emit`` carries, how many tokens made it and, when asked, their logprobs.

    A bare ``str`` passed to ``emit`` means one token and no logprobs; engines whose pieces
    may hold several tokens (held-back stop text, vLLM deltas) pass a Piece so usage counts
    stay exact.
    """

    text: str
    tokens: int = 1
    #: One entry per token when the request asked for logprobs, else empty.
    logprobs: tuple[TokenLogprob, ...] = ()
    #: The prompt's own tokens (``prompt_logprobs``), emitted once before any output.
    prompt: bool = False


#: Called with each piece of generated text; False stops the generation.
Emit = Callable[[Union[str, Piece]], bool]


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    seed: int
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    stop: tuple[str, ...] = field(default_factory=tuple)
    #: Whether the engine may start from a cached prompt prefix (False: a clean context,
    #: asked for with ``kv_hint: cold`` or ``determinism: strict``).
    reuse_prefix: bool = True
    #: vLLM's scale for tokens already seen (1.0 or None: off); llama.cpp's ``repeat_penalty``.
    repetition_penalty: Optional[float] = None
    #: Drop tokens below this fraction of the likeliest one's probability (None: the engine's default).
    min_p: Optional[float] = None
    #: Generate to ``max_tokens``: the model's end-of-generation tokens are never sampled.
    ignore_eos: bool = False
    #: ``determinism: strict``: a batching engine runs the sequence alone, so other work cannot change its text.
    strict: bool = False
    #: OpenAI's penalties on tokens already generated (None or 0: off).
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    #: Locally typical sampling (None or 1.0: off).
    typical_p: Optional[float] = None
    #: (token id, bias added to its logit); -100 bans a token, 100 all but forces it.
    logit_bias: tuple[tuple[int, float], ...] = ()
    #: End-of-generation and stop strings are ignored until this many tokens are out.
    min_tokens: int = 0
    #: Logprobs of each generated token and of this many alternatives (None: no logprobs).
    logprobs: Optional[int] = None
    #: Logprobs of the prompt's tokens with this many alternatives, emitted first (None: none).
    prompt_logprobs: Optional[int] = None
    #: Output constrained to JSON valid against this JSON Schema (JSON text), or ...
    json_schema: Optional[str] = None
    #: ... to this GBNF grammar (llama.cpp's grammar format; vLLM's xgrammar reads it too).
    grammar: Optional[str] = None


class EngineError(RuntimeError):
    """The engine failed; the pool reports it with the engine's name.

    ``fatal`` marks a failure of the engine itself (driver lost, device error) rather than
    of one request: the pool stops admitting and its supervisor restarts it. ``code`` says
    how a task-level failure reaches the client (an upstream's refusal of the request is
    INVALID_PARAMS, not INTERNAL).
    """

    def __init__(self, message: str, *, fatal: bool = False, code: Optional[Any] = None) -> None:
        super().__init__(message)
        self.fatal = fatal
        #: The stable error code the task ends with (orch.api.errors.ErrorCode); INTERNAL if None.
        self.code = code


class Engine(ABC):
    name: str = "engine"

    @property
    @abstractmethod
    def version(self) -> str: ...

    @property
    @abstractmethod
    def ctx_max(self) -> int:
        """Context (tokens) one slot can hold: prompt + output."""

    @abstractmethod
    def load(self) -> None:
        """Load the model; raise EngineError with a clear cause on failure."""

    @abstractmethod
    def count_tokens(self, prompt: str) -> int: ...

    @abstractmethod
    def generate(self, slot: int, prompt: str, params: GenerationParams, emit: Emit) -> FinishReason:
        """Generate on ``slot`` (in that slot's thread); returns why generation stopped
        (cancel is the caller's)."""

    # -- optional capabilities ---------------------------------------------------------
    #: True for an engine with an asyncio API: the pool then awaits ``generate_async`` on its
    #: own event loop, so each token reaches the stream without passing through a slot thread.
    generates_on_loop: bool = False

    async def generate_async(self, slot: int, prompt: str, params: GenerationParams, emit: Emit) -> FinishReason:
        """``generate`` for engines with ``generates_on_loop``; ``emit`` is called on the loop."""
        raise EngineError(f"engine {self.name} generates in a slot thread, not on the pool's loop")

    @property
    def chat_template(self) -> Optional[str]:
        """The model's own Jinja chat template (GGUF ``tokenizer.chat_template``), if any."""
        return None

    @property
    def special_tokens(self) -> dict[str, str]:
        """Text of the model's special tokens the chat template refers to (bos_token, eos_token)."""
        return {}

    @property
    def serves_embeddings(self) -> bool:
        return False

    @property
    def serves_completions(self) -> bool:
        """False for an engine loaded as an embedding model only (vLLM's pooling runner)."""
        return True

    def embed(self, slot: int, inputs: Sequence[str]) -> tuple[list[list[float]], int]:
        """One vector per input and the number of tokens read."""
        raise EngineError(f"engine {self.name} does not serve embeddings on this pool")

    def memory_needed(self) -> int:
        """Bytes the loaded model will hold (weights and KV cache); 0 when unknown."""
        return 0

    def cache_report(self) -> Optional[Resident]:
        """What the KV cache holds now, as text per cache entry (orch/core/prefix.py), for
        prefix-aware placement; None when the engine cannot tell (the pool then estimates).
        Called on the pool's loop several times a second: cheap, and safe beside generation."""
        return None

    @property
    def cache_capacity_tokens(self) -> int:
        """Tokens the KV cache holds in all (0: unknown); bounds the pool's estimate."""
        return 0

    def close(self) -> None:  # pragma: no cover - engines without resources
        pass
