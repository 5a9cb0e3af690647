"""Mock engine, for fault injection and benchmarks only (never a default).

Deterministic: the same prompt and seed give the same tokens. Speed is set by
``tokens_per_s`` (0 = as fast as possible) and ``first_token_ms``. Faults are commanded in
the prompt, so a test decides exactly which task fails and when:

- ``@fault=error`` or ``@fault=error:N``: raise an engine error (after N tokens);
- ``@fault=hang`` or ``@fault=hang:N``: stop producing (after N tokens) until closed;
- ``@fault=crash`` or ``@fault=crash:N``: kill the hosting process (after N tokens);
- ``@fault=fatal`` or ``@fault=fatal:N``: a fatal engine error (driver lost), which takes
  the whole pool down for a restart.

``fail_load: "<message>"`` makes every load fail, as a broken driver would;
``crash_on_load: true`` kills the hosting process during every load; ``load_ms`` makes
every load take that long (a large model's load, for on-demand loading) and ``close_ms``
every close (an engine slow to free its memory, for unloads);
``model_bytes`` is the memory the model claims, checked against the host before loading.

Prefill (for prefix-routing benchmarks): ``prefill_ms_per_token`` delays the first token by
that much per prompt token (words, as ``count_tokens`` counts them) not already cached. Like
llama.cpp's sequence ids, the engine keeps one cached token list per slot (the prompt and the
words it generated); a task takes the free entry sharing the longest prefix with its prompt
and reads only the rest. ``prefix_cache: false`` reads every prompt whole.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import threading
import time
from typing import Any, Optional, Sequence

from orch.api.events import FinishReason
from orch.engines.base import Emit, Engine, EngineError, GenerationParams

WORDS = (
    " the", " a", " pool", " token", " stream", " queue", " model", " cluster", " ray", " fast",
    " slow", " warm", " cold", " GPU", " batch", " task", " reply", " end", " and", " then",
)
_FAULT = re.compile(r"@fault=(error|hang|crash|fatal)(?::(\d+))?")


class MockEngine(Engine):
    name = "mock"

    def __init__(
        self,
        *,
        tokens_per_s: float = 0.0,
        first_token_ms: float = 0.0,
        ctx: int = 4096,
        fail_load: Optional[str] = None,
        version: str = "mock-1",
        slots: int = 1,
        embedding_dim: int = 0,
        crash_on_load: bool = False,
        model_bytes: int = 0,
        prefill_ms_per_token: float = 0.0,
        prefix_cache: bool = True,
        load_ms: float = 0.0,
        close_ms: float = 0.0,
    ) -> None:
        self.load_ms = load_ms
        self.close_ms = close_ms
        self.prefill_ms_per_token = prefill_ms_per_token
        self.prefix_cache = prefix_cache
        #: Words each cache entry holds, entries in use, and prompt tokens read / reused.
        self._cached: list[list[str]] = [[] for _ in range(max(1, slots))]
        self._busy: set[int] = set()
        self._cache_lock = threading.Lock()
        self.stats = {"prompt_evaluated": 0, "prompt_reused": 0}
        self.crash_on_load = crash_on_load
        self.model_bytes = model_bytes
        self.embedding_dim = embedding_dim
        self.tokens_per_s = tokens_per_s
        self.first_token_ms = first_token_ms
        self._ctx = ctx
        self.fail_load = fail_load
        self._version = version
        self.slots = slots
        self._closed = threading.Event()
        self.loaded = False

    @classmethod
    def from_options(cls, options: dict[str, Any], slots: int, ctx: Optional[int]) -> "MockEngine":
        known = {"tokens_per_s", "first_token_ms", "fail_load", "version", "embedding_dim", "crash_on_load",
                 "model_bytes", "prefill_ms_per_token", "prefix_cache", "load_ms", "close_ms"}
        unknown = set(options) - known
        if unknown:
            raise EngineError(f"unknown mock engine options: {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        return cls(slots=slots, ctx=ctx or 4096, **options)

    @property
    def version(self) -> str:
        return self._version

    @property
    def ctx_max(self) -> int:
        return self._ctx

    def load(self) -> None:
        if self.load_ms:
            self._closed.wait(self.load_ms / 1000)
        if self.crash_on_load:
            os._exit(18)
        if self.fail_load:
            raise EngineError(f"mock engine load failed: {self.fail_load}")
        self.loaded = True

    def count_tokens(self, prompt: str) -> int:
        return len(prompt.split()) + 1

    def generate(self, slot: int, prompt: str, params: GenerationParams, emit: Emit) -> FinishReason:
        fault = _FAULT.search(prompt)
        fault_kind, fault_at = (fault.group(1), int(fault.group(2) or 0)) if fault else (None, -1)
        digest = hashlib.sha256(f"{params.seed}:{prompt}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        interval = 1.0 / self.tokens_per_s if self.tokens_per_s > 0 else 0.0
        start = time.perf_counter()
        words = prompt.split()
        entry, reused = self._take_entry(words, params.reuse_prefix)
        uncached = len(words) + 1 - reused
        first_at = start + (self.first_token_ms + uncached * self.prefill_ms_per_token) / 1000.0
        out: list[str] = []
        try:
            for index in range(params.max_tokens):
                if index == fault_at:
                    self._fail(fault_kind, index)
                due = first_at + index * interval
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                word = WORDS[rng.randrange(len(WORDS))]
                out.append(word)
                if not emit(word):
                    return FinishReason.cancelled
            if fault_at >= params.max_tokens:
                self._fail(fault_kind, params.max_tokens)
            return FinishReason.length
        finally:
            self._release_entry(entry, words + "".join(out).split())

    def _take_entry(self, words: list[str], reuse: bool) -> tuple[int, int]:
        """The free cache entry sharing the longest prefix with ``words``, and that length
        (the last prompt token is always read, as llama.cpp does)."""
        with self._cache_lock:
            free = [i for i in range(len(self._cached)) if i not in self._busy] or [0]

            def common(i: int) -> int:
                count = 0
                for a, b in zip(self._cached[i], words):
                    if a != b:
                        break
                    count += 1
                return count

            shared = {i: common(i) if self.prefix_cache and reuse else 0 for i in free}
            entry = max(free, key=lambda i: (shared[i], -len(self._cached[i]), -i))
            self._busy.add(entry)
            self.stats["prompt_reused"] += shared[entry]
            self.stats["prompt_evaluated"] += len(words) + 1 - shared[entry]
            return entry, shared[entry]

    def _release_entry(self, entry: int, held: list[str]) -> None:
        with self._cache_lock:
            self._cached[entry] = held if self.prefix_cache else []
            self._busy.discard(entry)

    def memory_needed(self) -> int:
        return self.model_bytes

    @property
    def serves_embeddings(self) -> bool:
        return self.embedding_dim > 0

    def embed(self, slot: int, inputs: Sequence[str]) -> tuple[list[list[float]], int]:
        if not self.serves_embeddings:
            return super().embed(slot, inputs)
        vectors = []
        for text in inputs:
            rng = random.Random(hashlib.sha256(text.encode()).digest())
            vectors.append([rng.uniform(-1, 1) for _ in range(self.embedding_dim)])
        return vectors, sum(self.count_tokens(text) for text in inputs)

    def _fail(self, kind: Optional[str], index: int) -> None:
        if kind == "error":
            raise EngineError(f"mock engine error injected after {index} tokens")
        if kind == "fatal":
            raise EngineError(f"mock engine driver lost after {index} tokens", fatal=True)
        if kind == "hang":
            self._closed.wait()
            raise EngineError("mock engine closed while hung")
        if kind == "crash":
            os._exit(17)

    def close(self) -> None:
        self._closed.set()
        if self.close_ms:  # an engine that takes a while to free its memory
            time.sleep(self.close_ms / 1000)
