"""What vLLM's prefix cache holds, from its KV cache events (for prefix-aware placement).

vLLM's engine core (its own process) tells which blocks its prefix cache stores and drops
as KV events (``kv_events_config``: ``BlockStored`` with each block's parent and tokens,
``BlockRemoved``, ``AllBlocksCleared``), published over ZeroMQ. The pool's engine binds
them to a private ``ipc://`` endpoint and listens in a thread (``CacheEvents``); the blocks
form a tree (``BlockTree``), and each path from a root to a block no stored block extends is
a prefix the cache holds. Its tokens are decoded to text, which the pool hashes as the
ingress hashes prompts (orch/core/prefix.py). A block whose parent is gone no longer starts
a cached prefix and leaves the report; a gap in the events' sequence numbers (a dropped
message) forgets everything rather than report a guess.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import uuid
from typing import Any, Callable, Hashable, Optional

from orch.core.prefix import BLOCK_BYTES, MAX_REPORTED, Resident

log = logging.getLogger("orch.engine")

#: Text of the prefixes reported, at most (the pool reports MAX_REPORTED hashes at most).
MAX_TEXT_BYTES = MAX_REPORTED * BLOCK_BYTES
#: Seconds the listening thread waits for a message before it checks whether to stop.
POLL_MS = 200


class BlockTree:
    """vLLM's cached blocks (one KV cache group, on the GPU) and the prefixes they hold.

    ``decode`` turns token ids into the text's UTF-8 bytes. Not thread-safe: ``CacheEvents``
    holds a lock around it."""

    def __init__(self, decode: Callable[[list[int]], bytes]) -> None:
        self._decode = decode
        #: block hash -> (parent hash or None, its tokens, when it was stored)
        self._blocks: dict[Hashable, tuple[Optional[Hashable], tuple[int, ...], int]] = {}
        self._children: dict[Hashable, int] = {}
        self._stored = 0
        self._texts: dict[Hashable, bytes] = {}
        self.version = 0

    def apply(self, event: Any) -> None:
        """One event: stored blocks (``token_ids``), removed ones (``block_hashes`` only), or all cleared."""
        if getattr(event, "group_idx", None) not in (None, 0) or getattr(event, "medium", None) not in (None, "GPU"):
            return  # another KV cache group, or an offloading tier: not what a prompt reuses first
        if hasattr(event, "token_ids"):
            self._store(event)
        elif hasattr(event, "block_hashes"):
            for block in event.block_hashes:
                self._remove(block)
        else:
            self.clear()
            return
        self.version += 1

    def _store(self, event: Any) -> None:
        size = int(event.block_size) or 1
        parent = event.parent_block_hash
        for index, block in enumerate(event.block_hashes):
            tokens = tuple(event.token_ids[index * size:(index + 1) * size])
            if block not in self._blocks:
                self._stored += 1
                self._blocks[block] = (parent, tokens, self._stored)
                if parent is not None:
                    self._children[parent] = self._children.get(parent, 0) + 1
            parent = block

    def _remove(self, block: Hashable) -> None:
        entry = self._blocks.pop(block, None)
        self._texts.pop(block, None)
        if entry is not None and entry[0] is not None:
            left = self._children.get(entry[0], 0) - 1
            if left > 0:
                self._children[entry[0]] = left
            else:
                self._children.pop(entry[0], None)

    def clear(self) -> None:
        self._blocks.clear()
        self._children.clear()
        self._texts.clear()
        self.version += 1

    def _path(self, block: Hashable) -> Optional[list[int]]:
        """The tokens from the root to ``block``; None when an ancestor is gone."""
        parts: list[tuple[int, ...]] = []
        while block is not None:
            entry = self._blocks.get(block)
            if entry is None:
                return None
            parts.append(entry[1])
            block = entry[0]
        return [token for part in reversed(parts) for token in part]

    def _intact(self, block: Hashable) -> bool:
        while block is not None:
            entry = self._blocks.get(block)
            if entry is None:
                return False
            block = entry[0]
        return True

    def resident(self) -> Resident:
        """The text of each cached prefix (newest stored first, ``MAX_TEXT_BYTES`` at most),
        keyed by an index of the block that ends it."""
        leaves = sorted((entry[2], block) for block, entry in self._blocks.items() if block not in self._children)
        texts: list[tuple[int, bytes]] = []
        total = 0
        for order, block in reversed(leaves):
            text = self._texts.get(block)
            if text is None or not self._intact(block):  # an ancestor was dropped since
                tokens = self._path(block)
                text = self._texts[block] = self._decode(tokens) if tokens else b""
            if text:
                texts.append((order, text))
                total += len(text)
            if total >= MAX_TEXT_BYTES:
                break
        return Resident(self.version, tuple(texts))

    def __len__(self) -> int:
        return len(self._blocks)


class CacheEvents:
    """Listens to one vLLM engine core's KV events (see the module docstring)."""

    def __init__(self, endpoint: str, decode: Callable[[list[int]], bytes]) -> None:
        self.endpoint = endpoint
        self._tree = BlockTree(decode)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="vllm-kv-events", daemon=True)
        self._ready = threading.Event()
        self._failed = False

    @staticmethod
    def new_endpoint() -> str:
        return f"ipc://{os.path.join(tempfile.gettempdir(), f'orch-kv-{uuid.uuid4().hex[:12]}')}"

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(5)

    def report(self) -> Optional[Resident]:
        """The prefixes held now; None once listening failed (the pool then estimates)."""
        if self._failed or not self._thread.is_alive():
            return None
        with self._lock:
            return self._tree.resident()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2 * POLL_MS / 1000)
        if self.endpoint.startswith("ipc://"):
            try:
                os.unlink(self.endpoint[len("ipc://"):])
            except OSError:
                pass

    def _listen(self) -> None:
        try:
            import msgspec
            import zmq
            from vllm.distributed.kv_events import KVEventBatch

            socket = zmq.Context.instance().socket(zmq.SUB)
            socket.setsockopt(zmq.SUBSCRIBE, b"")
            socket.connect(self.endpoint)
            decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        except Exception as exc:  # no ZeroMQ or an older vLLM: the pool estimates instead
            log.warning("vLLM KV events unavailable (%s); the prefix report is an estimate", exc)
            self._failed = True
            self._ready.set()
            return
        self._ready.set()
        last: Optional[int] = None
        try:
            while not self._stop.is_set():
                if not socket.poll(POLL_MS):
                    continue
                frames = socket.recv_multipart()
                if len(frames) != 3:
                    continue
                seq = int.from_bytes(frames[1], "big", signed=True)
                batch = decoder.decode(frames[2])
                with self._lock:
                    if last is not None and seq != last + 1:
                        self._tree.clear()  # missed events: what we knew may be wrong
                    last = seq
                    for event in batch.events:
                        self._tree.apply(event)
        except Exception as exc:
            log.warning("vLLM KV events stopped (%s); the prefix report is an estimate", exc)
            self._failed = True
        finally:
            socket.close(linger=0)


def configure(options: dict[str, Any]) -> Optional[str]:
    """Ask vLLM's engine arguments ``options`` for KV events on a new private endpoint
    (returned), unless prefix caching is off, the options set their own events, or several
    engine cores would publish (data parallel: vLLM numbers their endpoints by tcp port only)."""
    if ("kv_events_config" in options or options.get("enable_prefix_caching") is False
            or int(options.get("data_parallel_size", 1) or 1) > 1):
        return None
    try:
        from vllm.config.kv_events import KVEventsConfig
    except ImportError:  # a vLLM without KV events: the pool estimates
        return None

    endpoint = CacheEvents.new_endpoint()
    # Published to this endpoint only: no replay socket, a short replay buffer.
    options["kv_events_config"] = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=endpoint,
                                                 buffer_steps=16)
    return endpoint


def listen(endpoint: str, tokenizer: Any, lock: threading.Lock) -> Optional[CacheEvents]:
    """A started listener for the engine core publishing to ``endpoint``; None if it cannot start."""
    try:
        events = CacheEvents(endpoint, decoder_for(tokenizer, lock))
        events.start()
    except Exception as exc:  # the engine serves without it; the pool estimates
        log.warning("vLLM KV events not read (%s); the prefix report is an estimate", exc)
        return None
    return events


def decoder_for(tokenizer: Any, lock: threading.Lock) -> Callable[[list[int]], bytes]:
    """Token ids to the text's UTF-8 bytes with vLLM's tokenizer; the tokens the tokenizer
    adds before a text (a BOS, for some models) are not the prompt's text."""
    with lock:
        plain = list(tokenizer.encode("a", add_special_tokens=False))
        full = list(tokenizer.encode("a"))
    added = full[:len(full) - len(plain)] if plain and full[len(full) - len(plain):] == plain else []

    def decode(tokens: list[int]) -> bytes:
        if added and tokens[:len(added)] == added:
            tokens = tokens[len(added):]
        with lock:
            text = tokenizer.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return text.encode("utf-8", "surrogatepass")

    return decode


def capacity_tokens(llm: Any) -> int:
    """Tokens vLLM's KV cache holds (blocks x block size; the engine core reports its block
    count when it starts); 0 when unknown."""
    cache = getattr(getattr(llm, "vllm_config", None), "cache_config", None)
    try:
        return int(cache.num_gpu_blocks or 0) * int(cache.block_size or 0) if cache is not None else 0
    except (TypeError, ValueError):
        return 0
