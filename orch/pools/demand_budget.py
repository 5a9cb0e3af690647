"""Models on demand: the memory budgets as the planner (orch/core/model_set.py) sees them at
load time. A budget the config declares is taken as it is; a GPU group whose GPUs' sizes the
config leaves open is read from NVML now, per GPU (free and total), on the node the model
manager runs on; a CPU budget left open is the host's available RAM. Without NVML (no driver,
no GPU, no pynvml) an open GPU budget is unknown and taken as having room, as before.
"""

from __future__ import annotations

from typing import Optional

from orch.config.model_set import BudgetConfig
from orch.core.capacity import available_memory, gpu_memory
from orch.core.model_set import Room


def measured_bytes(budget: BudgetConfig) -> Optional[int]:
    """The size a budget the config leaves open shows: its GPUs' memory, or the host's RAM."""
    declared = budget.declared_bytes()
    if declared is not None:
        return declared
    if budget.gpus:
        found = gpu_memory()
        return sum(total for total, _ in found[:budget.gpus]) if found else None
    return available_memory(0)[0]


def room(budget: BudgetConfig, size: Optional[int], probe=gpu_memory) -> Room:
    """The budget now: declared figures, else each GPU's free memory read at this moment."""
    if budget.gpus and not budget.gpu_memory_bytes:
        found = probe()
        if found:
            mine = found[:budget.gpus]
            return Room(budget.budget_bytes, tuple(free for _, free in mine), measured=True,
                        per_gpu_total=tuple(total for total, _ in mine))
        return Room(budget.budget_bytes)
    return budget.declared_room() or Room(size)
