"""llama.cpp with continuous batching (the default; ``engine_options: {batching: false}``
selects the per-slot engine of llamacpp.py).

One llama.cpp context serves every slot: its KV cache holds ``slots x ctx`` cells shared by
``slots`` sequence ids, and a decode thread (orch/engines/llamacpp_sched.py) advances all
running sequences in one ``llama_decode`` per token, reading new prompts between steps in
chunks of ``prefill_chunk`` tokens. On a memory-bound decode one batched step for several
sequences costs about what one sequence costs, which is where the throughput comes from.

The pool awaits ``generate_async`` on its loop (``generates_on_loop``): the decode thread
hands each piece of text to the loop, where ``emit`` runs; ``emit`` returning False cancels
the sequence, which leaves the batch at the next step.

Determinism: each sequence reads only its own cells (see llamacpp_sched.py), and on the CPU
its text in a batch was measured identical to its text alone. That is a measurement, not a
promise of llama.cpp's kernels, so a request that asks for ``determinism: strict`` runs
alone (the batch drains first, and nothing joins it): the same text whatever else the pool
is serving.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from pathlib import Path
from typing import Any, Optional

from orch.api.events import FinishReason
from orch.core.prefix import Resident
from orch.engines.base import Emit, EngineError, GenerationParams
from orch.engines.llamacpp import BATCHING_DEFAULT, CLOSE_WAIT_S, DEFAULT_CTX_CAP, LlamaCppEngine, log
from orch.engines.llamacpp_params import check_logit_bias, grammar_of
from orch.engines.llamacpp_sched import Scheduler
from orch.engines.llamacpp_seq import End, Sequence

#: Prompt tokens read per step, shared with the running sequences' tokens: a long prompt
#: holds the running streams back by about one chunk's prefill time per token they emit.
DEFAULT_PREFILL_CHUNK = 256
#: Options of the batched engine; the rest of engine_options must be llama.cpp's below.
OWN_OPTIONS = ("batching", "prefill_chunk", "kv_size", "kv_unified")
MODEL_OPTIONS = ("n_gpu_layers", "main_gpu", "use_mmap", "use_mlock")
CONTEXT_OPTIONS = ("flash_attn", "type_k", "type_v", "offload_kqv", "rope_freq_base", "rope_freq_scale")
#: Seconds a synchronous caller waits for the next piece before checking the loop is alive.
POLL_S = 1.0


def llamacpp_engine(model_path: Path, **options: Any) -> LlamaCppEngine:
    """The llama.cpp engine a pool's options ask for: batched when ``batching`` is true (or
    by default, see ``BATCHING_DEFAULT``), one context per slot otherwise; a pool that embeds
    keeps one context per slot."""
    if options.get("batching", BATCHING_DEFAULT) is True and not options.get("embedding"):
        return BatchedLlamaCppEngine(model_path, **options)
    return LlamaCppEngine(model_path, **options)


class BatchedLlamaCppEngine(LlamaCppEngine):
    generates_on_loop = True

    def __init__(self, model_path: Path, *, slots: int = 1, ctx: Optional[int] = None, threads: int = 1,
                 **options: Any) -> None:
        self.prefill_chunk = _int_option(options.pop("prefill_chunk", DEFAULT_PREFILL_CHUNK), "prefill_chunk")
        kv_size = options.pop("kv_size", None)
        self.kv_size = None if kv_size is None else _int_option(kv_size, "kv_size")
        self.kv_unified = options.pop("kv_unified", False)
        if not isinstance(self.kv_unified, bool):
            raise EngineError(f"engine option kv_unified must be true or false, not {self.kv_unified!r}")
        super().__init__(model_path, slots=slots, ctx=ctx, threads=threads, **options)
        unknown = sorted(set(self.llama_options) - set(MODEL_OPTIONS) - set(CONTEXT_OPTIONS))
        if unknown:
            raise EngineError(
                f"unknown llama.cpp engine option(s) with batching: {', '.join(unknown)}; a batching pool takes "
                f"{', '.join(OWN_OPTIONS + ('prefix_cache',) + MODEL_OPTIONS + CONTEXT_OPTIONS)}")
        self._model: Any = None
        self._context: Any = None
        self._scheduler: Optional[Scheduler] = None
        self._ctx_tokens = 0
        self._report: Optional[Resident] = None

    # -- properties --------------------------------------------------------------------------
    @property
    def ctx_max(self) -> int:
        if self._scheduler is None:
            raise EngineError("engine not loaded")
        return self._ctx_tokens

    @property
    def special_tokens(self) -> dict[str, str]:
        if self._model is None:
            return {}
        tokens = {}
        for name, token_id in (("bos_token", self._model.token_bos()), ("eos_token", self._model.token_eos())):
            if token_id is not None and token_id >= 0:
                tokens[name] = self._model.detokenize([token_id], special=True).decode("utf-8", errors="replace")
        return tokens

    def cache_report(self) -> Optional[Resident]:
        """The text each sequence id's cells hold, most recently started first (see
        llamacpp_sched.py); nothing without a prefix cache, or once closed."""
        scheduler = self._scheduler
        if scheduler is None:
            return Resident(-1)
        version, held = scheduler.resident
        report = self._report
        if report is not None and report.version == version:
            return report
        entries = sorted(((order, seq_id, owner, cells) for seq_id, (owner, cells, order) in enumerate(held)
                          if owner is not None), key=lambda entry: entry[:2], reverse=True)
        self._report = report = Resident(version, tuple((seq_id, owner.held_text(cells))
                                                        for _, seq_id, owner, cells in entries))
        return report

    @property
    def stats(self) -> dict[str, int]:
        """Prompt tokens evaluated and reused, decode steps, most sequences running at once."""
        return dict(self._scheduler.stats) if self._scheduler is not None else {}

    # -- lifecycle ---------------------------------------------------------------------------
    def load(self) -> None:
        llama_cpp = self._llama_cpp()
        from llama_cpp import _internals
        from llama_cpp._logger import set_verbose
        set_verbose(False)  # llama.cpp's load log to stderr, as Llama(verbose=False) does
        model_params = llama_cpp.llama_model_default_params()
        for name in MODEL_OPTIONS:
            if name in self.llama_options:
                setattr(model_params, name, self.llama_options[name])
        try:
            self._model = _internals.LlamaModel(path_model=str(self.model_path), params=model_params, verbose=False)
            self._ctx_tokens = self.requested_ctx or min(self._model.n_ctx_train(), DEFAULT_CTX_CAP)
            if self.kv_size is not None and not self.kv_unified:  # each sequence id owns kv_size / slots cells
                self._ctx_tokens = min(self._ctx_tokens, self.kv_size // self.slots)
            self._context = _internals.LlamaContext(model=self._model, params=self._context_params(llama_cpp),
                                                    verbose=False)
        except (ValueError, RuntimeError, OSError, TypeError) as exc:
            self._free()
            raise EngineError(f"llama.cpp could not load {self.model_path.name}: {exc}") from exc
        self.metadata = self._model.metadata()
        self._report = None
        self._scheduler = Scheduler(
            llama_cpp, self._context.ctx, self._model.vocab, self._tokens, slots=self.slots,
            ctx_tokens=self._ctx_tokens, chunk=self.prefill_chunk, unified=self.kv_unified,
            prefix_cache=self.prefix_cache)
        self._scheduler.start()

    def _context_params(self, llama_cpp: Any) -> Any:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.kv_size or self.slots * self._ctx_tokens
        params.n_batch = params.n_ubatch = max(self.prefill_chunk, self.slots)
        params.n_seq_max = self.slots
        params.kv_unified = self.kv_unified
        params.n_threads = params.n_threads_batch = self.threads
        params.no_perf = True
        options = self.llama_options
        # On unless asked off (llama-server's choice on the CPU too): a batched step for 8 sequences took
        # ~30 % less time with it. Off gives the unbatched engine's numerics (the same text for a seed).
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if options.get("flash_attn", True)
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        for name in ("type_k", "type_v", "offload_kqv", "rope_freq_base", "rope_freq_scale"):
            if name in options:
                setattr(params, name, options[name])
        return params

    def memory_needed(self) -> int:
        """The mapped weights plus the KV cache of ``kv_size`` cells (default slots x ctx),
        estimated as in the unbatched engine."""
        try:
            weights = self.model_path.stat().st_size
        except OSError:
            return 0
        cells = self.kv_size or self.slots * (self.requested_ctx or DEFAULT_CTX_CAP)
        return weights + cells * max(16 * 1024, weights // 20_000)

    def close(self) -> None:
        """Stop the decode loop (running generations end as cancelled), then free the
        context and model; if the loop is still inside llama.cpp after CLOSE_WAIT_S, leave the
        memory to the process's exit rather than free it under a running decode."""
        with self._idle:
            self._closing = True
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None and not scheduler.close(CLOSE_WAIT_S):
            log.warning("llama.cpp batch loop still decoding after %.0f s; not freeing the model under it",
                        CLOSE_WAIT_S)
            return
        self._free()

    def _free(self) -> None:
        context, model, self._context, self._model = self._context, self._model, None, None
        for resource in (context, model):  # the context before its model
            if resource is not None:
                try:
                    resource.close()
                except Exception:  # pragma: no cover - best effort on shutdown
                    pass

    # -- tokens and generation ---------------------------------------------------------------
    def _tokens(self, prompt: str) -> list[int]:
        with self._tokenizer_lock:
            return self._model.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)

    def count_tokens(self, prompt: str) -> int:
        if self._model is None:
            raise EngineError("engine not loaded")
        return len(self._tokens(prompt))

    def _submit(self, prompt: str, params: GenerationParams, deliver: Any,
                cancelled: Optional[threading.Event] = None) -> Sequence:
        scheduler = self._scheduler
        if scheduler is None or self._closing:
            raise EngineError("the llama.cpp engine is not loaded, or closed")
        check_logit_bias(params, scheduler.n_vocab)
        strict = getattr(params, "strict", None)
        seq = Sequence(prompt, params, deliver, alone=(not params.reuse_prefix) if strict is None else bool(strict),
                       cancelled=cancelled or threading.Event(), grammar=grammar_of(params))
        scheduler.submit(seq)
        return seq

    def generate(self, slot: int, prompt: str, params: GenerationParams, emit: Emit) -> FinishReason:
        pieces: queue.SimpleQueue = queue.SimpleQueue()
        seq = self._submit(prompt, params, pieces.put)
        while True:
            try:
                item = pieces.get(timeout=POLL_S)
            except queue.Empty:
                if self._scheduler is None or not self._scheduler.alive:
                    return FinishReason.cancelled  # closed; its loop ended every sequence
                continue
            if isinstance(item, End):
                return _ended(item)
            if not emit(item):
                seq.cancelled.set()
                return FinishReason.cancelled

    async def generate_async(self, slot: int, prompt: str, params: GenerationParams, emit: Emit) -> FinishReason:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def deliver(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(pieces.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody reads this sequence any more
                cancelled.set()

        self._submit(prompt, params, deliver, cancelled)
        try:
            while True:
                item = await pieces.get()
                if isinstance(item, End):
                    return _ended(item)
                if not emit(item):
                    cancelled.set()
                    return FinishReason.cancelled
        except asyncio.CancelledError:  # the pool is stopping: the sequence leaves the batch
            cancelled.set()
            raise


def _ended(end: End) -> FinishReason:
    if end.error is not None:
        raise end.error
    return end.finish


def _int_option(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EngineError(f"engine option {name} must be a whole number of tokens, 1 or more, not {value!r}")
    return value
