"""Prefix hashes: what a pool has cached, told without its prompts' text.

Token ids exist only inside a pool (the tokenizer is there), so the ingress and the pools
agree on text instead: the rendered prompt's UTF-8 bytes are cut into ``BLOCK_BYTES``-byte
blocks and each block's hash is chained with the one before it (keyed with a per-cluster
salt), so hash ``i`` stands for the whole prefix ``0..i``. Two prompts share their first
``n`` hashes exactly when they share their first ``n`` full blocks (up to hash collisions,
2^-64 each). Only full blocks are hashed: a prefix shorter than one block is not worth a
routing decision.

The ingress hashes each prompt once and sends the chain with the task. A pool reports at
most ``MAX_REPORTED`` hashes in its placement view, from one of two sources (``source``):

- ``engine``: what its engine's KV cache holds now. An engine that can tell (llama.cpp)
  says, per cache entry (a sequence id, a slot), the bytes of the text whose tokens its
  cells hold: the prompt as far as it was read, then the output fed back; the pool hashes
  them with the cluster's salt. A prompt whose cells were overwritten (its entry reused by
  an unrelated prompt, a purge, a reload, a restart) leaves the report with them. Prompts
  admitted but not yet read in (queued, or waiting for the next step) are reported too, at
  most ``entries`` of them, until the engine's report holds them: a task placed behind one
  finds its prefix read by the time it runs, and without them a burst of prompts sharing a
  system prompt would scatter over the pools before the first one is read.
- ``estimate``: an engine that cannot tell (vLLM, the mock engine): the chains of its last
  ``entries`` admitted prompts, least recently used first out, bounded by the tokens its KV
  cache holds when the engine says (``capacity_tokens``), forgotten when the engine is
  reloaded or the pool restarts. An engine that evicts sooner makes it optimistic;
  placement then loses only the prefill it hoped to save.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

#: Bytes of prompt text per block.
BLOCK_BYTES = 64
#: Blocks hashed per prompt (64 KiB of prompt text); the rest of a longer prompt is not matched.
MAX_PROMPT_BLOCKS = 1024
#: Hashes a pool reports in its view, at most (8 bytes each on the wire).
MAX_REPORTED = 2048
#: Fewest uncached prompt tokens a task needs for its first token to measure prefill speed.
MIN_RATE_TOKENS = 64
#: Prompt bytes per token assumed before a pool has measured its own (bounds the estimate).
DEFAULT_BYTES_PER_TOKEN = 4.0

_PACK = struct.Struct("<Q")


def salt_for(cluster: str) -> bytes:
    """The hash key of one cluster (its namespace): equal prompts on two clusters hash apart."""
    return hashlib.blake2b(cluster.encode(), digest_size=16, person=b"orch-prefix").digest()


def block_hashes(text: str, salt: bytes, limit: int = MAX_PROMPT_BLOCKS) -> tuple[int, ...]:
    """The chained hashes of ``text``'s full blocks (at most ``limit``)."""
    return chain_of(text.encode("utf-8", "surrogatepass"), salt, limit)


def chain_of(data: bytes, salt: bytes, limit: int = MAX_PROMPT_BLOCKS, start: Sequence[int] = ()) -> tuple[int, ...]:
    """The chained hashes of ``data``'s full blocks (at most ``limit``); ``start``, the hashes
    of a text that ``data`` begins with, is reused rather than hashed again."""
    count = min(len(data) // BLOCK_BYTES, limit)
    out = list(start[:count])
    previous = _PACK.pack(out[-1]) if out else b""
    for index in range(len(out), count):
        block = data[index * BLOCK_BYTES:(index + 1) * BLOCK_BYTES]
        previous = hashlib.blake2b(previous + block, digest_size=8, key=salt).digest()
        out.append(_PACK.unpack(previous)[0])
    return tuple(out)


def token_ends(prompt: bytes, pieces: Iterable[bytes]) -> list[int]:
    """Where each token's text ends in ``prompt``, for the tokens (their pieces, special ones
    rendered) that spell its beginning, in order. A first piece that is not the prompt's start
    (a BOS token the tokenizer adds) spells nothing, and a first piece may carry the leading
    space a SentencePiece tokenizer adds; any other piece that is not the text at that point
    ends the list, so the ends never claim text the tokens do not hold."""
    ends: list[int] = []
    pos = 0
    for index, piece in enumerate(pieces):
        if prompt.startswith(piece, pos):
            pos += len(piece)
        elif pos == 0 and piece[:1] == b" " and prompt.startswith(piece[1:]):
            pos = len(piece) - 1
        elif not (index == 0 and pos == 0):
            break
        ends.append(pos)
    return ends


def held_text(prompt: bytes, pieces: Sequence[bytes]) -> bytes:
    """The text of the tokens a cache entry holds from position 0 (their ``pieces``), which
    began as ``prompt``'s tokens: the prompt as far as they spell it and, once it is whole,
    the output fed back after it."""
    ends = token_ends(prompt, pieces)
    if not ends:
        return b""
    if ends[-1] < len(prompt):
        return prompt[:ends[-1]]
    return prompt + b"".join(pieces[len(ends):])


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


def _packed(chains: Iterable[Sequence[int]], max_reported: int) -> bytes:
    """At most ``max_reported`` hashes of ``chains`` (given newest first), each chain's
    leading blocks first (so a truncated report still matches the longest shared prefixes)."""
    seen: dict[int, None] = {}
    for chain in chains:
        for h in chain:
            if len(seen) >= max_reported:
                return pack(seen)
            seen.setdefault(h, None)
    return pack(seen)


@dataclass(frozen=True)
class Resident:
    """What an engine's KV cache holds now: per cache entry (a key of the engine's: a sequence
    id, a slot), the bytes of the text whose tokens its cells hold, most recently used first.
    ``version`` moves on whenever any of it changes."""

    version: int
    texts: tuple[tuple[int, bytes], ...] = ()


#: An engine's ``cache_report``: None when it cannot tell what its cache holds.
Reader = Callable[[], Optional[Resident]]


class PrefixCache:
    """What a pool's engine holds, as hash chains (see the module docstring).

    ``entries``: prompts kept for the estimate (0: the engine keeps no prefix cache, report
    nothing). ``salt``: the cluster's (``salt_for``); without it the engine's text cannot be
    hashed as the ingress does, and the report is the estimate."""

    def __init__(self, entries: int, max_reported: int = MAX_REPORTED, salt: Optional[bytes] = None) -> None:
        self.entries = max(0, entries)
        self.max_reported = max_reported
        self.salt = salt
        self._reader: Optional[Reader] = None
        #: Tokens the engine's KV cache holds in all (0: unknown), bounding the estimate.
        self.capacity_tokens = 0
        #: last hash of a chain -> the chain, least recently used first (the estimate).
        self._chains: OrderedDict[int, tuple[int, ...]] = OrderedDict()
        #: The engine's report: its version, and per entry its text and that text's chain.
        self._from_engine = False
        self._version: Optional[int] = None
        self._texts: dict[int, tuple[bytes, tuple[int, ...]]] = {}
        #: With the engine's report: prompts admitted but not read into its cache yet (at most
        #: ``entries``, newest last), until its report holds them.
        self._pending: OrderedDict[int, tuple[int, ...]] = OrderedDict()
        self._packed: bytes = b""
        self._dirty = False
        self._held: frozenset[int] = frozenset()
        #: Prompt tokens admitted that were (probably) cached, and those that were not.
        self.hit_tokens = 0
        self.miss_tokens = 0
        #: Moving averages: prefill ms per uncached prompt token, prompt bytes per token.
        self.prefill_ms_per_token = 0.0
        self.bytes_per_token = 0.0

    def reset(self, entries: int, reader: Optional[Reader] = None, capacity_tokens: int = 0) -> None:
        """A new engine (or none): nothing is cached; ``reader`` tells what it holds from now on
        (when it can), else it holds about ``entries`` prompts and ``capacity_tokens`` tokens."""
        self.entries = max(0, entries)
        self._reader = reader
        self.capacity_tokens = max(0, capacity_tokens)
        self.clear()

    @property
    def source(self) -> str:
        """Where the report comes from: ``engine``, ``estimate``, or "" (nothing reported)."""
        if self.entries == 0:
            return ""
        self.refresh()
        return "engine" if self._from_engine else "estimate"

    def admit(self, chain: Sequence[int], prompt_bytes: int, prompt_tokens: int) -> int:
        """One admitted prompt: its tokens probably cached (returned), counted as hits and
        the rest as misses; then, for the estimate, its chain is recorded as the newest entry."""
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
        if not chain or self.entries == 0:
            return 0
        self.refresh()
        return overlap_blocks(chain, self._held)

    def record(self, chain: Sequence[int]) -> None:
        """The estimate: ``chain``'s prompt is (about to be) in the engine's cache, the newest
        entry; a prompt that is a prefix of a newer one is kept by the newer one's chain. An
        engine that tells what it holds needs no guess."""
        if not chain or self.entries == 0:
            return
        chain = tuple(chain)
        if self._from_engine:
            self._pending.pop(chain[-1], None)
            self._pending[chain[-1]] = chain
            while len(self._pending) > self.entries:
                self._pending.popitem(last=False)
            self._held = self._held | frozenset(chain)
            self._dirty = True
            return
        self._chains.pop(chain[-1], None)
        self._chains[chain[-1]] = chain
        while len(self._chains) > self.entries:
            self._chains.popitem(last=False)
        self._held = frozenset(h for c in self._chains.values() for h in c)
        per_token = self.bytes_per_token or DEFAULT_BYTES_PER_TOKEN
        while self.capacity_tokens and len(self._chains) > 1 and (
                len(self._held) * BLOCK_BYTES / per_token > self.capacity_tokens):
            self._chains.popitem(last=False)
            self._held = frozenset(h for c in self._chains.values() for h in c)
        self._dirty = True

    def refresh(self) -> None:
        """Read the engine's cache, when it can tell and has changed since (each text's chain
        is extended rather than hashed again while the text only grows)."""
        if self._reader is None or self.salt is None or self.entries == 0:
            return
        resident = self._reader()
        if resident is None:  # it cannot tell (any more): estimate from the next admission on
            if self._from_engine:
                self.clear()
            return
        if not self._from_engine:
            self._from_engine = True
            self._chains.clear()
        if resident.version == self._version:
            return
        texts: dict[int, tuple[bytes, tuple[int, ...]]] = {}
        for key, data in resident.texts:
            old_data, old_chain = self._texts.get(key, (b"", ()))
            start = old_chain if old_chain and data.startswith(old_data[:len(old_chain) * BLOCK_BYTES]) else ()
            texts[key] = (data, chain_of(data, self.salt, start=start))
        self._version, self._texts = resident.version, texts
        held = frozenset(h for _, chain in texts.values() for h in chain)
        for last in [last for last in self._pending if last in held]:  # read in: the report holds it now
            del self._pending[last]
        self._held = held.union(*self._pending.values())
        self._dirty = True

    def clear(self) -> None:
        self._chains.clear()
        self._texts.clear()
        self._pending.clear()
        self._from_engine, self._version = False, None
        self._packed, self._dirty, self._held = b"", False, frozenset()

    def report(self) -> bytes:
        """At most ``max_reported`` hashes, newest entries first, each entry's leading blocks
        first (so a truncated report still matches the longest shared prefixes)."""
        if self.entries == 0:
            return b""
        self.refresh()
        if self._dirty:
            chains = ([chain for _, chain in self._texts.values()] + list(reversed(self._pending.values()))
                      if self._from_engine else reversed(self._chains.values()))
            self._packed, self._dirty = _packed(chains, self.max_reported), False
        return self._packed

    def __len__(self) -> int:
        return len(self._texts) if self._from_engine else len(self._chains)
