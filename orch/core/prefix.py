"""Prefix hashes: what a pool has cached, told without its prompts' text.

Token ids exist only inside a pool (the tokenizer is there), so the ingress and the pools
agree on text instead: the rendered prompt's UTF-8 bytes are cut into ``BLOCK_BYTES``-byte
blocks and each block's hash is chained with the one before it (keyed with a per-cluster
salt), so hash ``i`` stands for the whole prefix ``0..i``. Two prompts share their first
``n`` hashes exactly when they share their first ``n`` full blocks (up to hash collisions,
2^-64 each). Only full blocks are hashed: a prefix shorter than one block is not worth a
routing decision.

The ingress hashes each prompt once and sends the chain with the task; the pool records it
at admission (``PrefixCache``) and reports at most ``MAX_REPORTED`` hashes in its placement
view. What a pool reports approximates its engine's cache: the pool keeps the chains of its
last ``entries`` prompts (the engine's cache holds about that many sequences: one per
sequence id for llama.cpp and the mock engine), least recently used first out, and forgets
all of them when its engine is reloaded or its pool restarts. An engine that evicts sooner
(vLLM under memory pressure) makes the report optimistic; placement then loses only the
prefill it hoped to save.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from typing import Iterable, Sequence

#: Bytes of prompt text per block.
BLOCK_BYTES = 64
#: Blocks hashed per prompt (64 KiB of prompt text); the rest of a longer prompt is not matched.
MAX_PROMPT_BLOCKS = 1024
#: Hashes a pool reports in its view, at most (8 bytes each on the wire).
MAX_REPORTED = 2048
#: Fewest uncached prompt tokens a task needs for its first token to measure prefill speed.
MIN_RATE_TOKENS = 64

_PACK = struct.Struct("<Q")


def salt_for(cluster: str) -> bytes:
    """The hash key of one cluster (its namespace): equal prompts on two clusters hash apart."""
    return hashlib.blake2b(cluster.encode(), digest_size=16, person=b"orch-prefix").digest()


def block_hashes(text: str, salt: bytes, limit: int = MAX_PROMPT_BLOCKS) -> tuple[int, ...]:
    """The chained hashes of ``text``'s full blocks (at most ``limit``)."""
    data = text.encode("utf-8", "surrogatepass")
    count = min(len(data) // BLOCK_BYTES, limit)
    out: list[int] = []
    previous = b""
    for index in range(count):
        block = data[index * BLOCK_BYTES:(index + 1) * BLOCK_BYTES]
        previous = hashlib.blake2b(previous + block, digest_size=8, key=salt).digest()
        out.append(_PACK.unpack(previous)[0])
    return tuple(out)


def entries_for(engine: str, slots: int, options: dict) -> int:
    """Prompts an engine's prefix cache holds, about: one per sequence id (llama.cpp, the
    mock engine), many for vLLM's block cache, none where we cannot know (external servers)."""
    if engine in ("llamacpp", "mock"):
        return slots if options.get("prefix_cache", True) is not False else 0
    if engine == "vllm":
        return 0 if options.get("enable_prefix_caching") is False else max(64, 8 * slots)
    return 0


def pack(hashes: Iterable[int]) -> bytes:
    """Hashes as bytes (what a pool's view carries: smaller to pickle than a set of ints)."""
    return b"".join(_PACK.pack(h) for h in hashes)


def merged(newest: bytes, report: bytes, max_reported: int = MAX_REPORTED) -> bytes:
    """``newest`` packed hashes first, then ``report``, at most ``max_reported`` hashes."""
    return (newest + report)[:8 * max_reported]


def unpack(data: bytes) -> frozenset[int]:
    return frozenset(h for (h,) in _PACK.iter_unpack(data[:len(data) - len(data) % 8]))


def overlap_blocks(chain: Sequence[int], cached: frozenset[int]) -> int:
    """How many leading blocks of ``chain`` are in ``cached`` (chained hashes: the first miss
    ends the shared prefix)."""
    count = 0
    for h in chain:
        if h not in cached:
            break
        count += 1
    return count


class PrefixCache:
    """The prompts a pool's engine probably holds, as hash chains (see the module docstring).

    ``entries``: prompts kept (0: the engine keeps no prefix cache, report nothing)."""

    def __init__(self, entries: int, max_reported: int = MAX_REPORTED) -> None:
        self.entries = max(0, entries)
        self.max_reported = max_reported
        #: last hash of a chain -> the chain, least recently used first.
        self._chains: OrderedDict[int, tuple[int, ...]] = OrderedDict()
        self._packed: bytes = b""
        self._dirty = False
        self._held: frozenset[int] = frozenset()
        #: Prompt tokens admitted that were (probably) cached, and those that were not.
        self.hit_tokens = 0
        self.miss_tokens = 0
        #: Moving averages: prefill ms per uncached prompt token, prompt bytes per token.
        self.prefill_ms_per_token = 0.0
        self.bytes_per_token = 0.0

    def reset(self, entries: int) -> None:
        """A new engine (or none): nothing is cached; it holds about ``entries`` prompts."""
        self.entries = max(0, entries)
        self.clear()

    def admit(self, chain: Sequence[int], prompt_bytes: int, prompt_tokens: int) -> int:
        """One admitted prompt: its tokens probably cached (returned), counted as hits and
        the rest as misses; then its chain is recorded as the newest entry."""
        if prompt_bytes > 0 and prompt_tokens > 0:
            ratio = prompt_bytes / prompt_tokens
            self.bytes_per_token = ratio if not self.bytes_per_token else 0.9 * self.bytes_per_token + 0.1 * ratio
        blocks = self.match(chain)
        hit = min(prompt_tokens - 1, round(prompt_tokens * blocks * BLOCK_BYTES / prompt_bytes)) if blocks else 0
        hit = max(0, hit)
        self.hit_tokens += hit
        self.miss_tokens += max(0, prompt_tokens - hit)
        self.record(chain)
        return hit

    def prefilled(self, ms: float, uncached_tokens: int) -> None:
        """A task's first token came ``ms`` after its start, with ``uncached_tokens`` to read."""
        # A mostly cached prompt's first token is the first decode step and the batch it joins,
        # not prefill: counting it per uncached token would make every cached token look costly.
        if uncached_tokens < MIN_RATE_TOKENS or ms <= 0:
            return
        rate = ms / uncached_tokens
        self.prefill_ms_per_token = rate if not self.prefill_ms_per_token else (
            0.8 * self.prefill_ms_per_token + 0.2 * rate)

    def match(self, chain: Sequence[int]) -> int:
        """Leading blocks of ``chain`` held now."""
        if not chain or not self._chains:
            return 0
        return overlap_blocks(chain, self._held)

    def record(self, chain: Sequence[int]) -> None:
        """``chain``'s prompt is (about to be) in the engine's cache: newest entry; a prompt
        that is a prefix of a newer one is kept by the newer one's chain."""
        if not chain or self.entries == 0:
            return
        chain = tuple(chain)
        self._chains.pop(chain[-1], None)
        self._chains[chain[-1]] = chain
        while len(self._chains) > self.entries:
            self._chains.popitem(last=False)
        self._dirty = True
        self._held = frozenset(h for c in self._chains.values() for h in c)

    def clear(self) -> None:
        self._chains.clear()
        self._packed, self._dirty, self._held = b"", False, frozenset()

    def report(self) -> bytes:
        """At most ``max_reported`` hashes, newest prompts first, each prompt's leading
        blocks first (so a truncated report still matches the longest shared prefixes)."""
        if self._dirty:
            seen: dict[int, None] = {}
            for chain in reversed(self._chains.values()):
                for h in chain:
                    if len(seen) >= self.max_reported:
                        break
                    seen.setdefault(h, None)
            self._packed, self._dirty = pack(seen), False
        return self._packed

    def __len__(self) -> int:
        return len(self._chains)
