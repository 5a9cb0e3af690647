"""Reading a llama.cpp context's logits rows: token text, logprobs, end-of-generation bans
and grammar-constrained draws.

Logprobs are those of the model's own distribution (log-softmax of the raw logits row, before
penalties, grammar and temperature), as vLLM and OpenAI report them. They cost a pass over the
vocabulary per token, so they are computed only for requests that ask.
"""

from __future__ import annotations

import ctypes
from typing import Any, Optional, Sequence

import numpy as np

from orch.api.errors import ErrorCode
from orch.engines.base import EngineError, TokenLogprob

#: llama.cpp's ``llama_token_data`` (id, logit, p), for arrays the samplers work on in place.
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
#: Prompt rows turned into logprobs together: bounds the copies to a few MB for large vocabularies.
ROWS_AT_ONCE = 16


def log_softmax(rows: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32 (a new array)."""
    rows = np.asarray(rows, dtype=np.float32)
    shifted = rows - rows.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def top(logprobs: np.ndarray, n: int) -> list[int]:
    """Ids of the ``n`` likeliest tokens of one row, likeliest first."""
    n = min(n, logprobs.shape[-1])
    if n <= 0:
        return []
    ids = np.argpartition(-logprobs, n - 1)[:n]
    return [int(i) for i in ids[np.argsort(-logprobs[ids], kind="stable")]]


class Logits:
    """Logits rows of the last decode and the text of tokens, for one context."""

    def __init__(self, llama_cpp: Any, ctx: Any, vocab: Any, n_vocab: int) -> None:
        self._ll, self._ctx, self._vocab, self.n_vocab = llama_cpp, ctx, vocab, n_vocab
        self._buffer = ctypes.create_string_buffer(256)
        self._pieces: dict[tuple[int, bool], bytes] = {}
        #: llama_token_data arrays for constrained sampling, made on first use.
        self._candidates: Optional[np.ndarray] = None
        self._single = np.zeros(1, dtype=TOKEN_DATA)
        self._data_p = ctypes.POINTER(llama_cpp.llama_token_data)

    def row(self, index: int) -> np.ndarray:
        """The logits row of batch entry ``index``, a view of llama.cpp's buffer (writable)."""
        pointer = self._ll.llama_get_logits_ith(self._ctx, index)
        if not pointer:
            raise RuntimeError(f"llama.cpp has no logits for batch entry {index}")
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def sample_constrained(self, chain: Any, grammar: Any, index: int) -> int:
        """Sample batch entry ``index`` with ``chain`` under ``grammar``, as llama.cpp's own
        sampler does: draw without the grammar, and only when the grammar refuses that token
        filter the whole vocabulary (some ms per token) and draw again. The result follows the
        grammar-filtered distribution; both samplers then accept the token."""
        row = self.row(index)
        token = self._apply(chain, row)
        self._single[0] = (token, 0.0, 0.0)
        single = self._ll.llama_token_data_array(data=self._single.ctypes.data_as(self._data_p), size=1,
                                                 selected=-1, sorted=False)
        self._ll.llama_sampler_apply(grammar, ctypes.byref(single))
        if not np.isfinite(self._single["logit"][0]):
            token = self._apply(chain, row, grammar)
        self._ll.llama_sampler_accept(grammar, token)
        self._ll.llama_sampler_accept(chain, token)
        return token

    def _apply(self, chain: Any, row: np.ndarray, first: Any = None) -> int:
        """The token ``chain`` (after ``first``, when given) selects from ``row``; accepts nothing."""
        if self._candidates is None:
            self._candidates = np.zeros(self.n_vocab, dtype=TOKEN_DATA)
        candidates = self._candidates
        candidates["id"] = np.arange(self.n_vocab, dtype=np.int32)  # samplers reorder the array
        candidates["logit"] = row
        candidates["p"] = 0.0
        array = self._ll.llama_token_data_array(data=candidates.ctypes.data_as(self._data_p), size=self.n_vocab,
                                                selected=-1, sorted=False)
        if first is not None:
            self._ll.llama_sampler_apply(first, ctypes.byref(array))
            if not np.isfinite(candidates["logit"][:array.size]).any():
                # Sampling from nothing would pick a token the grammar then fails on (an abort).
                raise EngineError("grammar: no token can continue the output at this point (the grammar "
                                  "allows no text the model's tokens can spell here)", code=ErrorCode.INVALID_PARAMS)
        self._ll.llama_sampler_apply(chain, ctypes.byref(array))
        if not 0 <= array.selected < array.size:
            raise RuntimeError("the llama.cpp sampler chain selected no token")
        return int(candidates["id"][array.selected])

    def ban(self, index: int, tokens: Sequence[int]) -> None:
        """Make ``tokens`` impossible at batch entry ``index`` (its sampler reads the row next)."""
        if tokens:
            self.row(index)[list(tokens)] = -np.inf

    def piece(self, token: int, special: bool = False) -> bytes:
        """A token's bytes (``special``: control tokens as their text, else as nothing)."""
        key = (token, special)
        cached = self._pieces.get(key)
        if cached is not None:
            return cached
        size = self._ll.llama_token_to_piece(self._vocab, token, self._buffer, len(self._buffer), 0, special)
        if size < 0:  # longer than the buffer: grow it once for this and later tokens
            self._buffer = ctypes.create_string_buffer(-size)
            size = self._ll.llama_token_to_piece(self._vocab, token, self._buffer, len(self._buffer), 0, special)
        piece = self._buffer.raw[:size]
        if len(self._pieces) < 1 << 17:
            self._pieces[key] = piece
        return piece

    def entry(self, token: int, logprobs: Optional[np.ndarray], n_top: int, text: Optional[bytes] = None) -> TokenLogprob:
        """``token``'s TokenLogprob from its position's log-softmax row (None: nothing predicts it)."""
        raw = self.piece(token, special=True) if text is None else text
        if logprobs is None:
            return TokenLogprob(raw.decode("utf-8", errors="replace"), None, tuple(raw))
        alternatives = tuple((self.piece(t, special=True).decode("utf-8", errors="replace"), float(logprobs[t]))
                             for t in top(logprobs, n_top))
        return TokenLogprob(raw.decode("utf-8", errors="replace"), float(logprobs[token]), tuple(raw), alternatives)

    def prompt_entries(self, tokens: Sequence[int], rows: Sequence[tuple[int, int]], n_top: int) -> list[TokenLogprob]:
        """Entries of the prompt tokens that ``rows`` ((batch entry, position) pairs) predict:
        the row at position p gives token p + 1."""
        entries: list[TokenLogprob] = []
        for start in range(0, len(rows), ROWS_AT_ONCE):
            block = rows[start:start + ROWS_AT_ONCE]
            logprobs = log_softmax(np.stack([self.row(index) for index, _ in block]))
            entries += [self.entry(tokens[pos + 1], logprobs[k], n_top) for k, (_, pos) in enumerate(block)]
        return entries
