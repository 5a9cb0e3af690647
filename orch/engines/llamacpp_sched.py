"""The decode loop of the batched llama.cpp engine.

One thread owns the llama.cpp context. At each step it builds one batch: the last sampled
token of every running sequence, then prompt tokens of sequences still reading theirs, up
to ``chunk`` tokens in all; one ``llama_decode`` advances them together, and each sequence
samples its next token from its own row of logits with its own sampler chain. A long prompt
is read over several steps, so the running streams wait at most one chunk for it.

KV cache: ``slots x ctx`` cells for ``slots`` sequence ids, each holding at most ``ctx``
positions, so the cache cannot fill unless the operator sized it smaller (``kv_size``). By
default each sequence id has its own ``ctx`` cells (llama.cpp's non-unified cache): a
sequence's attention then reads only its own cells, in the same order whatever else runs,
which keeps its text the same in a batch as alone. llama.cpp then computes one graph per run
of consecutive ids in the batch, so the batch goes in id order and a new sequence takes an id
next to the running ones. A finished sequence's cells stay as a prefix cache: the next
sequence takes the free id whose cached tokens match its prompt longest (when that is worth
an id out of the run) and removes only the rest (``llama_memory_seq_rm``). With ``kv_unified: true`` all
ids share one pool of cells, and a prompt that matches a running sequence's cells longer
shares them (``llama_memory_seq_cp``, no copy); numerics then depend on the neighbours.

Cache report: each id's cells stand for the first tokens of one sequence (its ``owner``: the
prompt as far as it was read, then the output fed back). After each turn of the loop the
scheduler publishes (owner, cells held, owner's start) per id in ``resident``, which another
thread reads without a lock; an id whose cells are dropped or taken by another prompt
changes owner there, so the pool's report (orch/core/prefix.py) loses that prompt with them.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any, Callable, Optional

from orch.api.errors import ErrorCode
from orch.api.events import FinishReason
from orch.core.prefix import token_ends
from orch.engines.base import EngineError, TokenLogprob
from orch.engines.llamacpp_logits import Logits, log_softmax
from orch.engines.llamacpp_params import compile_grammar
from orch.engines.llamacpp_seq import End, Sequence, TextStream, sampler_chain

log = logging.getLogger("orch.engine")

#: Cached prompt tokens below which a match does not choose the sequence id: reading that
#: few again costs less than one more graph per step for a sequence id out of its run.
MIN_PREFIX_REUSE = 8


class Scheduler:
    """Continuous batching over one llama.cpp context (``ctx``, a ``llama_context_p``)."""

    def __init__(self, llama_cpp: Any, ctx: Any, vocab: Any, tokenize: Callable[[str], list[int]], *,
                 slots: int, ctx_tokens: int, chunk: int, unified: bool, prefix_cache: bool) -> None:
        self._ll = llama_cpp
        self._ctx = ctx
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._vocab = vocab
        self._n_vocab = self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self._tokenize = tokenize
        self.slots, self.ctx_tokens, self.chunk = slots, ctx_tokens, max(chunk, slots)
        self.unified, self.prefix_cache = unified, prefix_cache
        self._batch = llama_cpp.llama_batch_init(self.chunk, 0, 1)
        self._logits = Logits(llama_cpp, ctx, vocab, self._n_vocab)
        self._eog: Optional[tuple[int, ...]] = None
        #: Tokens whose cells each sequence id holds, positions 0..len-1, and the sequence
        #: they came from (None: no cells).
        self._cached: list[list[int]] = [[] for _ in range(slots)]
        self._owner: list[Optional[Sequence]] = [None] * slots
        self._started = 0
        #: (version, ((owner, cells, start order) per id)), replaced whole after each turn.
        self.resident: tuple[int, tuple[tuple[Optional[Sequence], int, int], ...]] = (0, ())
        self._free: list[int] = list(range(slots))
        self._active: list[Sequence] = []
        self._pending: deque[Sequence] = deque()
        #: Prompts wait while the cache is full, until a running sequence ends.
        self._prefill_blocked = False
        self._cond = threading.Condition()
        self._closing = False
        self._purge: Optional[threading.Event] = None
        self._failure: Optional[EngineError] = None
        #: Prompt tokens evaluated and taken from the cache, and decode steps (for tests and logs).
        self.stats = {"prompt_evaluated": 0, "prompt_reused": 0, "steps": 0, "max_running": 0}
        self._thread = threading.Thread(target=self._run, name="llamacpp-batch", daemon=True)

    # -- other threads ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, seq: Sequence) -> None:
        with self._cond:
            if self._failure is not None:
                raise self._failure
            if self._closing:
                raise EngineError("the llama.cpp engine is not loaded, or closed")
            self._pending.append(seq)
            self._cond.notify()

    def purge(self, timeout: float) -> None:
        """Drop the cached cells of every sequence id not running."""
        done = threading.Event()
        with self._cond:
            if self._closing or not self._thread.is_alive():
                return
            self._purge = done
            self._cond.notify()
        done.wait(timeout)

    def close(self, timeout: float) -> bool:
        """Stop the loop (running and waiting sequences end as cancelled); False if it is
        still inside llama.cpp after ``timeout``."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        self._ll.llama_batch_free(self._batch)
        return True

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._closing or self._pending or self._active or self._purge):
                        self._cond.wait()
                    if self._closing:
                        break
                    admitted = self._admissible()
                    purge, self._purge = self._purge, None
                if purge is not None:
                    for seq_id in self._free:
                        self._forget(seq_id)
                    purge.set()
                for seq in admitted:
                    self._start(seq)
                for seq in [s for s in self._active if s.cancelled.is_set()]:
                    self._finish(seq, FinishReason.cancelled)
                if self._active:
                    self._step()
                self._publish()
        except Exception as exc:  # a bug or a broken context: fail what runs, refuse the rest
            log.exception("llama.cpp batch loop failed")
            with self._cond:
                self._failure = EngineError(f"the llama.cpp decode loop failed: {exc}", fatal=True)
            for seq in list(self._active):
                self._finish(seq, FinishReason.stop, error=self._failure)
        finally:
            with self._cond:
                self._closing = True
                waiting, self._pending = list(self._pending), deque()
            for seq in list(self._active):
                self._finish(seq, FinishReason.cancelled)
            for seq in waiting:
                seq.deliver(End(FinishReason.cancelled, self._failure))
            self._owner = [None] * self.slots
            self._publish()

    def _publish(self) -> None:
        """What each id's cells hold, for ``resident`` (a new version only when it changed)."""
        held = tuple((owner, len(cells), owner.start_order) if owner is not None and cells else (None, 0, 0)
                     for owner, cells in zip(self._owner, self._cached))
        version, before = self.resident
        if held != before:
            self.resident = (version + 1, held)

    def _admissible(self) -> list[Sequence]:
        """Waiting sequences that may start now, in arrival order (called under the lock). A
        sequence that must run alone waits for the batch to drain, and nothing joins it."""
        admitted: list[Sequence] = []
        while self._pending and len(admitted) < len(self._free):
            seq = self._pending[0]
            if seq.cancelled.is_set():
                self._pending.popleft()
                seq.deliver(End(FinishReason.cancelled))
                continue
            running = self._active + admitted
            if any(s.alone for s in running) or (seq.alone and running):
                break
            admitted.append(self._pending.popleft())
        return admitted

    def _start(self, seq: Sequence) -> None:
        try:
            tokens = self._tokenize(seq.prompt)
        except Exception as exc:
            seq.deliver(End(FinishReason.stop, EngineError(f"llama.cpp could not tokenize the prompt: {exc}",
                                                           code=ErrorCode.INVALID_PARAMS)))
            return
        if not tokens or len(tokens) >= self.ctx_tokens:
            seq.deliver(End(FinishReason.stop, EngineError(
                f"the prompt is {len(tokens)} tokens; this pool's context holds {self.ctx_tokens} tokens of "
                f"prompt and output together, so send a prompt of 1 to {self.ctx_tokens - 1} tokens",
                code=ErrorCode.INVALID_PARAMS)))
            return
        if seq.grammar is not None:
            field = "json_schema" if seq.params.json_schema is not None else "grammar"
            try:
                seq.grammar_sampler = compile_grammar(self._ll, self._vocab, seq.grammar, field)
            except EngineError as exc:
                seq.deliver(End(FinishReason.stop, exc))
                return
        banned = self._eog_tokens() if seq.params.ignore_eos else ()
        seq.sampler = sampler_chain(self._ll, seq.params, self._n_vocab, banned)
        seq.tokens = tokens
        if seq.alone and self.unified:  # the same cells, chunks and neighbours (none) every time
            self._clear()
        # Prompt logprobs need every prompt position's logits, so such a prompt is read whole.
        reuse = self.prefix_cache and seq.params.reuse_prefix and not seq.alone and not seq.wants_prompt_logprobs
        seq.seq_id, seq.n_past = self._place(tokens, reuse)
        if self.prefix_cache:
            self._own(seq)
        self.stats["prompt_reused"] += seq.n_past
        self.stats["prompt_evaluated"] += len(tokens) - seq.n_past
        if seq.wants_prompt_logprobs:
            seq.prompt_logprobs = [self._logits.entry(tokens[0], None, 0)]
        seq.stream = TextStream(seq.params.stop)
        self._active.append(seq)
        self.stats["max_running"] = max(self.stats["max_running"], len(self._active))

    def _place(self, tokens: list[int], reuse: bool) -> tuple[int, int]:
        """A free sequence id for ``tokens`` and how many of them its cells already hold."""
        limit = len(tokens) - 1  # the last prompt token is always read: its logits start the output

        def common(seq_id: int) -> int:
            count = 0
            for a, b in zip(self._cached[seq_id], tokens[:limit]):
                if a != b:
                    break
                count += 1
            return count

        running = [s.seq_id for s in self._active]
        running_ids = set(running)

        def neighbours(seq_id: int) -> int:  # running ids next to it: a run of ids it extends or joins
            return (seq_id - 1 in running_ids) + (seq_id + 1 in running_ids)

        if not reuse:
            seq_id = min(self._free, key=lambda s: (-neighbours(s), len(self._cached[s]), s))
            self._free.remove(seq_id)
            self._forget(seq_id)
            return seq_id, 0
        matches = {s: common(s) for s in self._free}
        # A long cached prefix wins; otherwise the id that keeps the running ids in one run
        # (see _by_seq_id), then the one whose cells are worth least.
        seq_id = max(self._free, key=lambda s: (matches[s] if matches[s] >= MIN_PREFIX_REUSE else 0,
                                                neighbours(s), -len(self._cached[s]), -s))
        self._free.remove(seq_id)
        kept = matches[seq_id]
        source = max(running, key=common, default=None) if self.unified else None
        if source is not None and common(source) > kept:
            kept = common(source)
            self._forget(seq_id)
            self._ll.llama_memory_seq_cp(self._mem, source, seq_id, 0, kept)
            self._cached[seq_id] = self._cached[source][:kept]
            return seq_id, kept
        if not self._ll.llama_memory_seq_rm(self._mem, seq_id, kept, -1):
            self._forget(seq_id)
            return seq_id, 0
        del self._cached[seq_id][kept:]
        return seq_id, kept

    def _forget(self, seq_id: int) -> None:
        self._ll.llama_memory_seq_rm(self._mem, seq_id, -1, -1)
        self._cached[seq_id] = []
        self._owner[seq_id] = None

    def _clear(self) -> None:
        self._ll.llama_memory_clear(self._mem, True)
        self._cached = [[] for _ in range(self.slots)]
        self._owner = [None] * self.slots

    def _own(self, seq: Sequence) -> None:
        """``seq``'s id now holds its prompt's first ``n_past`` tokens: it owns the cells, and
        its prompt's text is mapped to its tokens for the cache report."""
        self._started += 1
        seq.start_order = self._started
        seq.prompt_bytes = seq.prompt.encode("utf-8", "surrogatepass")
        seq.token_ends = token_ends(seq.prompt_bytes, (self._logits.piece(t, special=True) for t in seq.tokens))
        self._owner[seq.seq_id] = seq

    def _eog_tokens(self) -> tuple[int, ...]:
        if self._eog is None:
            is_eog = self._ll.llama_vocab_is_eog
            self._eog = tuple(t for t in range(self._n_vocab) if is_eog(self._vocab, t))
        return self._eog

    # -- one step ------------------------------------------------------------------------------
    @property
    def _by_seq_id(self) -> list[Sequence]:
        """The running sequences in id order. Without a unified cache each id has its own
        stream of cells, and llama.cpp splits a batch into one graph per run of consecutive
        ids in batch order (``split_equal``, sequential); in arrival order, 8 sequences
        whose ids came back shuffled took up to 8 graphs a step, each reading every weight."""
        return sorted(self._active, key=lambda seq: seq.seq_id)

    def _step(self) -> None:
        batch, n = self._batch, 0
        samples: list[tuple[Sequence, int]] = []
        fed: list[tuple[Sequence, list[int]]] = []
        #: (sequence, batch entry, position) of prompt tokens whose logits were asked for.
        prompt_rows: list[tuple[Sequence, int, int]] = []

        def add(token: int, seq: Sequence, pos: int, sample: bool, logits: bool = False) -> None:
            nonlocal n
            batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = token, pos, 1, sample or logits
            batch.seq_id[n][0] = seq.seq_id
            if sample:
                samples.append((seq, n))
            elif logits:
                prompt_rows.append((seq, n, pos))
            n += 1

        # Every running sequence's next token first; prompts fill the rest of the chunk in
        # arrival order. The batch itself goes in sequence-id order (see _by_seq_id).
        budget = self.chunk - sum(1 for seq in self._active if not seq.prefilling)
        parts: dict[int, list[int]] = {}
        for seq in self._active:
            if not seq.prefilling or budget <= 0 or self._prefill_blocked:
                continue
            parts[seq.seq_id] = part = seq.tokens[seq.n_past:seq.n_past + budget]
            budget -= len(part)
        for seq in self._by_seq_id:
            if not seq.prefilling:
                add(seq.next_token, seq, seq.n_past, True)
                fed.append((seq, [seq.next_token]))
            elif seq.seq_id in parts:
                part = parts[seq.seq_id]
                last, every = len(seq.tokens) - 1, seq.wants_prompt_logprobs
                for offset, token in enumerate(part):
                    add(token, seq, seq.n_past + offset, seq.n_past + offset == last, every)
                fed.append((seq, part))
        if n == 0:  # only prompts, blocked: a step without them frees nothing
            self._prefill_blocked = False
            return
        batch.n_tokens = n
        self.stats["steps"] += 1
        code = self._ll.llama_decode(self._ctx, batch)
        if code != 0:
            self._decode_failed(code, fed)
            return
        for seq, part in fed:
            seq.n_past += len(part)
            self._cached[seq.seq_id].extend(part)
        for seq in {id(s): s for s, _, _ in prompt_rows}.values():
            rows = [(index, pos) for s, index, pos in prompt_rows if s is seq]
            seq.prompt_logprobs += self._logits.prompt_entries(seq.tokens, rows, seq.params.prompt_logprobs)
        for seq, index in samples:
            if seq.prefilling and self._prompt_read(seq):
                continue
            try:
                sampled = self._sample(seq, index)
            except EngineError as exc:  # this sequence's grammar is stuck; the others go on
                self._finish(seq, FinishReason.stop, error=exc)
                continue
            self._accept(seq, *sampled)

    def _prompt_read(self, seq: Sequence) -> bool:
        """The prompt is in: its logprobs leave first; True when no output is asked (max_tokens 0)."""
        if seq.wants_prompt_logprobs:
            seq.deliver(seq.take(seq.prompt, prompt=True))
        if seq.params.max_tokens <= 0:
            self._finish(seq, FinishReason.length)
            return True
        return False

    def _sample(self, seq: Sequence, index: int) -> tuple[int, Optional[TokenLogprob]]:
        """The next token from batch entry ``index`` and, when asked, its logprob entry (taken
        from the row before end-of-generation is banned for ``min_tokens``)."""
        params = seq.params
        logprobs = log_softmax(self._logits.row(index)) if params.logprobs is not None else None
        if seq.generated < (params.min_tokens or 0):
            self._logits.ban(index, self._eog_tokens())
        if seq.grammar_sampler is not None:
            token = self._logits.sample_constrained(seq.sampler, seq.grammar_sampler, index)
        else:
            token = self._ll.llama_sampler_sample(seq.sampler, self._ctx, index)
        if logprobs is None:
            return token, None
        return token, self._logits.entry(token, logprobs, params.logprobs, self._logits.piece(token))

    def _accept(self, seq: Sequence, token: int, logprob: Optional[TokenLogprob]) -> None:
        seq.generated += 1
        if self._ll.llama_vocab_is_eog(self._vocab, token):
            self._finish(seq, FinishReason.stop, seq.stream.flush())
            return
        seq.unsent += 1
        if logprob is not None:
            seq.unsent_logprobs.append(logprob)
        stops = seq.generated >= (seq.params.min_tokens or 0)
        piece = self._logits.piece(token)
        text, stopped = seq.stream.push(piece, stops)
        if stopped:
            self._finish(seq, FinishReason.stop, text)
        elif seq.generated >= seq.params.max_tokens or seq.n_past >= self.ctx_tokens:
            self._finish(seq, FinishReason.length, text + seq.stream.flush())
        else:
            if text:
                seq.deliver(seq.take(text))
            seq.next_token = token
            seq.output += piece
            seq.output_ends.append(len(seq.output))

    def _finish(self, seq: Sequence, finish: FinishReason, text: str = "",
                error: Optional[EngineError] = None) -> None:
        if error is None and finish != FinishReason.cancelled and (text or seq.unsent):
            seq.deliver(seq.take(text))  # the last tokens, even those a stop string cut to nothing
        seq.deliver(End(finish, error))
        self._active.remove(seq)
        self._prefill_blocked = False
        for sampler in (seq.sampler, seq.grammar_sampler):
            if sampler is not None:
                self._ll.llama_sampler_free(sampler)
        seq.sampler = seq.grammar_sampler = None
        if error is not None or not self.prefix_cache:
            self._forget(seq.seq_id)
        self._free.append(seq.seq_id)

    def _decode_failed(self, code: int, fed: list[tuple[Sequence, list[int]]]) -> None:
        """``llama_decode`` refused the batch. 1 (no free cells; the cache is left as it was):
        drop idle cached cells, else hold prompts back until a sequence ends, else refuse the
        prompts (or the longest sequence) with a retriable error. Anything else is fatal."""
        if code == 1:
            idle = [s for s in self._free if self._cached[s]]
            if idle:
                for seq_id in idle:
                    self._forget(seq_id)
                return
            prompts = [seq for seq, _ in fed if seq.prefilling]
            if prompts and len(prompts) < len(fed) and not self._prefill_blocked:
                self._prefill_blocked = True
                return
            victims = prompts or [max((seq for seq, _ in fed), key=lambda s: s.n_past)]
            for seq in victims:
                self._finish(seq, FinishReason.stop, error=EngineError(
                    f"the llama.cpp KV cache ({self._ll.llama_n_ctx(self._ctx)} cells) is full; retry shortly, or "
                    "give the pool more cells (engine_options.kv_size, default slots x ctx)",
                    code=ErrorCode.ADMISSION_REJECT))
            return
        failure = EngineError(f"llama_decode failed with code {code}", fatal=code < 0)
        for seq in list(self._active):
            self._finish(seq, FinishReason.stop, error=failure)
        self._clear()
