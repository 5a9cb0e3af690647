"""llama.cpp through llama-cpp-python, in process.

One ``Llama`` context per slot: the GGUF is memory-mapped, so the weights are shared by the
OS and each extra slot costs only its KV cache. Used with ``engine_options: {batching: false}``
and for embeddings; by default one context's slots are decoded together instead
(orch/engines/llamacpp_batch.py, ``llamacpp_engine`` there picks the class).

Prefix cache: a slot keeps the tokens it evaluated last, and a generation whose prompt starts
with the same tokens (a chat's system prompt and earlier turns, a repeated prompt) evaluates
only the rest, as llama.cpp's own server does. A request that asks for ``kv_hint: cold`` or
``determinism: strict``, or a pool with ``engine_options: {prefix_cache: false}``, starts
from a clean context instead, so the same prompt, parameters and seed give byte-identical
text whatever ran before. (On the CPU the two give the same text in practice; GPU kernels
may round differently when the prompt is split, hence the strict mode.)

Cache report: when a generation ends, its slot's cached tokens are mapped back to text (the
prompt, then the output fed back) for the pool's prefix report; while a slot generates, or
after it was reset, it reports nothing (its old tokens are being overwritten).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from orch.api.events import FinishReason
from orch.core.prefix import Resident, held_text
from orch.engines.base import Emit, Engine, EngineError, GenerationParams
from orch.engines.llamacpp_params import check_logit_bias, compile_grammar, grammar_of, invalid

#: llama.cpp seeds are 32-bit; wider request seeds are folded by modulo.
SEED_MODULUS = 2**32
DEFAULT_CTX_CAP = 4096
#: Seconds close() waits for running calls to leave llama.cpp before it frees the model.
CLOSE_WAIT_S = 30.0
#: Whether a pool that does not set ``engine_options.batching`` decodes its slots together
#: (one llama.cpp context, continuous batching; see llamacpp_batch.py).
BATCHING_DEFAULT = True

log = logging.getLogger("orch.engine")


class LlamaCppEngine(Engine):
    name = "llamacpp"

    def __init__(
        self, model_path: Path, *, slots: int = 1, ctx: Optional[int] = None, threads: int = 1, **llama_options: Any
    ) -> None:
        self.model_path = Path(model_path)
        prefix_cache = llama_options.pop("prefix_cache", True)
        if not isinstance(prefix_cache, bool):
            raise EngineError(f"engine option prefix_cache must be true or false, not {prefix_cache!r}")
        self.prefix_cache = prefix_cache
        batching = llama_options.pop("batching", BATCHING_DEFAULT)
        if not isinstance(batching, bool):
            raise EngineError(f"engine option batching must be true or false, not {batching!r}")
        if llama_options.get("embedding"):
            # Decoder models report no pooling; one vector per input needs one (1 = mean).
            llama_options.setdefault("pooling_type", 1)
        self.llama_options = llama_options
        self.slots = slots
        self.requested_ctx = ctx
        self.threads = threads
        self._contexts: list = []
        self._tokenizer_lock = threading.Lock()
        #: Calls inside llama.cpp right now; close() waits for them (freeing a model under a
        #: running decode crashes the process), and ``_closing`` makes them stop at the next token.
        self._in_use = 0
        self._idle = threading.Condition()
        self._closing = False
        self._version = ""
        self._eog: Optional[tuple[int, ...]] = None
        self.metadata: dict[str, str] = {}
        #: The text each slot's cache holds (slot -> (generation order, text)), and its version.
        self._held: dict[int, tuple[int, bytes]] = {}
        self._held_version = 0

    @property
    def version(self) -> str:
        return self._version

    @property
    def ctx_max(self) -> int:
        if not self._contexts:
            raise EngineError("engine not loaded")
        return self._contexts[0].n_ctx()

    @property
    def chat_template(self) -> Optional[str]:
        return self.metadata.get("tokenizer.chat_template")

    @property
    def special_tokens(self) -> dict[str, str]:
        if not self._contexts:
            return {}
        llm = self._contexts[0]
        tokens = {}
        for name, token_id in (("bos_token", llm.token_bos()), ("eos_token", llm.token_eos())):
            if token_id is not None and token_id >= 0:
                tokens[name] = llm.detokenize([token_id], special=True).decode("utf-8", errors="replace")
        return tokens

    @property
    def serves_embeddings(self) -> bool:
        return bool(self.llama_options.get("embedding"))

    @contextlib.contextmanager
    def _using(self) -> Iterator[None]:
        with self._idle:
            if self._closing or not self._contexts:
                raise EngineError("the llama.cpp engine is not loaded, or closed")
            self._in_use += 1
        try:
            yield
        finally:
            with self._idle:
                self._in_use -= 1
                self._idle.notify_all()

    def embed(self, slot: int, inputs: Sequence[str]) -> tuple[list[list[float]], int]:
        if not self.serves_embeddings:
            return super().embed(slot, inputs)
        with self._using():
            return self._embed(slot, inputs)

    def _embed(self, slot: int, inputs: Sequence[str]) -> tuple[list[list[float]], int]:
        llm = self._contexts[slot]
        self._hold(slot, None)
        llm.reset()
        try:
            vectors, tokens = llm.embed(list(inputs), normalize=True, truncate=False, return_count=True)
        except ValueError as exc:
            raise EngineError(f"llama.cpp could not embed the input: {exc}") from exc
        if vectors and isinstance(vectors[0], float):  # one input comes back unwrapped
            vectors = [vectors]
        return [[float(x) for x in v] for v in vectors], int(tokens)

    def _llama_cpp(self) -> Any:
        """llama-cpp-python, imported when a pool loads (it is heavy), and the model file checked."""
        try:
            import llama_cpp
        except ImportError as exc:  # pragma: no cover - dependency of the package
            raise EngineError(f"llama-cpp-python is not installed: {exc}") from exc
        self._version = llama_cpp.__version__
        if not self.model_path.is_file():
            raise EngineError(f"model file {self.model_path} does not exist")
        return llama_cpp

    def load(self) -> None:
        llama_cpp = self._llama_cpp()
        ctx = self.requested_ctx
        try:
            for _ in range(self.slots):
                llm = llama_cpp.Llama(
                    model_path=str(self.model_path),
                    n_ctx=ctx or 0,
                    n_threads=self.threads,
                    n_threads_batch=self.threads,
                    verbose=False,
                    **self.llama_options,
                )
                if ctx is None:
                    # n_ctx=0 means the model's trained context; cap it so slots stay small.
                    trained = llm.n_ctx()
                    ctx = min(trained, DEFAULT_CTX_CAP)
                    if ctx != trained:
                        llm.close()
                        llm = llama_cpp.Llama(
                            model_path=str(self.model_path),
                            n_ctx=ctx,
                            n_threads=self.threads,
                            n_threads_batch=self.threads,
                            verbose=False,
                            **self.llama_options,
                        )
                self._contexts.append(llm)
        except TypeError as exc:
            self.close()
            raise EngineError(f"unknown llama.cpp engine option: {exc}") from exc
        except (ValueError, RuntimeError, OSError) as exc:
            self.close()
            raise EngineError(f"llama.cpp could not load {self.model_path.name}: {exc}") from exc
        self.metadata = dict(self._contexts[0].metadata)

    def memory_needed(self) -> int:
        """The mapped weights plus a KV cache per slot (f16, estimated from the file size
        when the architecture's sizes are not known before loading)."""
        try:
            weights = self.model_path.stat().st_size
        except OSError:
            return 0
        ctx = self.requested_ctx or DEFAULT_CTX_CAP
        kv_per_token = max(16 * 1024, weights // 20_000)
        return weights + self.slots * ctx * kv_per_token

    def count_tokens(self, prompt: str) -> int:
        with self._tokenizer_lock:
            return len(self._contexts[0].tokenize(prompt.encode("utf-8"), add_bos=True, special=True))

    def generate(self, slot: int, prompt: str, params: GenerationParams, emit: Emit) -> FinishReason:
        with self._using():
            return self._generate(slot, prompt, params, emit)

    def _generate(self, slot: int, prompt: str, params: GenerationParams, emit: Emit) -> FinishReason:
        llm = self._contexts[slot]
        extra = self._sampling(llm, params)
        if params.max_tokens <= 0:  # llama-cpp-python reads 0 as "up to the context's end"
            return FinishReason.length
        self._hold(slot, None)
        if not (self.prefix_cache and params.reuse_prefix):
            llm.reset()  # otherwise llama-cpp-python evaluates only what follows the cached prefix
        finish = FinishReason.length
        stream = llm.create_completion(
            prompt,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=params.seed % SEED_MODULUS,
            stop=list(params.stop) or None,
            stream=True,
            **extra,
        )
        try:
            for chunk in stream:
                choice = chunk["choices"][0]
                text = choice["text"]
                if self._closing or (text and not emit(text)):
                    return FinishReason.cancelled
                if choice.get("finish_reason") == "stop":
                    finish = FinishReason.stop
        except ValueError as exc:
            llm.reset()
            raise EngineError(f"llama.cpp refused the prompt: {exc}") from exc
        except BaseException:
            llm.reset()  # a decode that failed midway leaves no prefix worth trusting
            raise
        finally:
            stream.close()
            if self.prefix_cache and llm.n_tokens:  # a reset above left nothing to report
                held = held_text(prompt.encode("utf-8", "surrogatepass"), _pieces(llm, llm._input_ids.tolist()))
                self._hold(slot, held)
        return finish

    def _hold(self, slot: int, text: Optional[bytes]) -> None:
        with self._idle:
            if text:
                self._held[slot] = (self._held_version, text)
            else:
                self._held.pop(slot, None)
            self._held_version += 1

    def cache_report(self) -> Optional[Resident]:
        """The text each idle slot's cache holds, most recently used first."""
        with self._idle:
            held = sorted(self._held.items(), key=lambda item: item[1][0], reverse=True)
            return Resident(self._held_version, tuple((slot, text) for slot, (_, text) in held))

    def _sampling(self, llm: Any, params: GenerationParams) -> dict[str, Any]:
        """llama-cpp-python's completion arguments for what the request asks beyond the basics;
        what its ``Llama`` API has no clean way to do is refused, naming the parameter."""
        for name, asked in (("logprobs", params.logprobs is not None),
                            ("prompt_logprobs", params.prompt_logprobs is not None),
                            ("min_tokens", (params.min_tokens or 0) > 0)):
            if asked:
                raise invalid(f"{name} is not supported by llama.cpp (batching: false); "
                              "a llama.cpp pool with batching (the default) supports it")
        extra: dict[str, Any] = {}
        for name, argument in (("repetition_penalty", "repeat_penalty"), ("min_p", "min_p"),
                               ("typical_p", "typical_p"), ("presence_penalty", "presence_penalty"),
                               ("frequency_penalty", "frequency_penalty")):
            if getattr(params, name) is not None:
                extra[argument] = float(getattr(params, name))
        check_logit_bias(params, llm.n_vocab())
        biases = {int(token): float(bias) for token, bias in params.logit_bias}
        if params.ignore_eos:
            biases.update((token, float("-inf")) for token in self._end_tokens(llm))
        if biases:
            extra["logit_bias"] = biases
        grammar = grammar_of(params)
        if grammar is not None:
            import llama_cpp
            from llama_cpp.llama_grammar import LlamaGrammar

            field = "json_schema" if params.json_schema is not None else "grammar"
            # Compiled once here to refuse a bad one: llama-cpp-python would chain a null sampler.
            llama_cpp.llama_sampler_free(compile_grammar(llama_cpp, llm._model.vocab, grammar, field))
            extra["grammar"] = LlamaGrammar.from_string(grammar)
        return extra

    def _end_tokens(self, llm: Any) -> tuple[int, ...]:
        """The model's end-of-generation tokens (banned under ``ignore_eos``)."""
        if self._eog is None:
            import llama_cpp

            vocab = llm._model.vocab
            self._eog = tuple(t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t))
        return self._eog

    def close(self) -> None:
        """Free the model once no call is inside llama.cpp (running ones stop at their next
        token); if one is still there after CLOSE_WAIT_S, leave the memory to the process's
        exit rather than free it under a running decode."""
        with self._idle:
            self._closing = True
            if not self._idle.wait_for(lambda: self._in_use == 0, timeout=CLOSE_WAIT_S):
                log.warning("llama.cpp engine: %d call(s) still running after %.0f s; not freeing the model under them",
                            self._in_use, CLOSE_WAIT_S)
                return
        for llm in self._contexts:
            try:
                llm.close()
            except Exception:  # pragma: no cover - best effort on shutdown
                pass
        self._contexts = []
        for slot in list(self._held):
            self._hold(slot, None)


def _pieces(llm: Any, tokens: list[int]) -> list[bytes]:
    """Each token's text (special tokens rendered), as llama.cpp spells it."""
    import llama_cpp

    vocab, buffer, out = llm._model.vocab, ctypes.create_string_buffer(64), []
    for token in tokens:
        size = llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, True)
        if size < 0:
            buffer = ctypes.create_string_buffer(-size)
            size = llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, True)
        out.append(buffer.raw[:size])
    return out
