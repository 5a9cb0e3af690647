"""top_p among the top_k survivors, as a vLLM logits processor.

top_p applies to the distribution top_k leaves, so only the k survivors need sorting. vLLM
sorts the whole vocabulary for every sequence that has a top_p, at every step; on CPU that
took its own server from 157 to 104 tokens/s at 8 streams of SmolLM2 (49,152 tokens). A
request with both (the orchestrator's defaults: top_k 40, top_p 0.95) therefore reaches vLLM
with top_k alone (``torch.topk``, no sort) and its top_p in ``extra_args[TOP_P_ARG]``; this
processor keeps, among each such row's k largest logits, the fewest whose probabilities
(after the temperature: it is argmax-invariant, which vLLM applies after the temperature and
min_p, as its own top_p) reach top_p, and sets the rest to -inf, the mask vLLM's own
``apply_top_k_top_p`` gives up to ties.

vLLM loads it by name in its engine process (``logits_processors``); this module imports
vLLM and torch, so only that process and the tests import it.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.interface import MoveDirectionality

from orch.engines.vllm_params import TOP_P_ARG


class TopPAmongTopK(LogitsProcessor):
    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        #: (top_k, top_p) of each batch row whose request asked for both.
        self.rows: dict[int, tuple[int, float]] = {}

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: Optional[BatchUpdate]) -> None:
        if not batch_update:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _, _ in batch_update.added:
            top_p = (params.extra_args or {}).get(TOP_P_ARG)
            if top_p is not None and params.top_k and params.top_k > 0:
                self.rows[index] = (params.top_k, float(top_p))
            else:
                self.rows.pop(index, None)
        for source, target, direction in batch_update.moved:
            moving, displaced = self.rows.pop(source, None), self.rows.pop(target, None)
            if moving is not None:
                self.rows[target] = moving
            if direction == MoveDirectionality.SWAP and displaced is not None:
                self.rows[source] = displaced

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        rows = sorted(self.rows)
        index = torch.tensor(rows, device=logits.device)
        ks = torch.tensor([self.rows[r][0] for r in rows], device=logits.device)
        ps = torch.tensor([self.rows[r][1] for r in rows], device=logits.device, dtype=torch.float32)
        chosen = logits.index_select(0, index)
        values, tokens = chosen.topk(min(int(ks.max()), chosen.shape[1]), dim=-1)  # largest first
        within_k = torch.arange(values.shape[1], device=logits.device)[None, :] < ks[:, None]
        values = values.masked_fill(~within_k, float("-inf"))
        probs = values.float().softmax(dim=-1)
        # A token stays while the probability of those above it has not reached top_p yet.
        keep = ((probs.cumsum(dim=-1) - probs) < ps[:, None]) & within_k
        keep[:, 0] = True
        masked = torch.full_like(chosen, float("-inf"))
        masked.scatter_(1, tokens, values.masked_fill(~keep, float("-inf")))
        return logits.index_copy_(0, index, masked)
