"""Will the model fit? Checked before a pool loads, so a model too large for the pool's
VRAM (or, on CPU, the host's free memory) fails fast with the numbers instead of an
out-of-memory crash in the middle of loading. Plain Python, no Ray."""

from __future__ import annotations

import os
from typing import Optional

from orch.engines.base import EngineError

GiB = 1024**3


def check_fits(pool_id: str, needed_bytes: int, available: tuple[Optional[int], str]) -> None:
    """Raise EngineError when ``needed_bytes`` exceeds what is available (when both are known)."""
    available_bytes, where = available
    if not needed_bytes or available_bytes is None:
        return
    if needed_bytes > available_bytes:
        raise EngineError(
            f"model needs about {needed_bytes / GiB:.2f} GiB but {where} has {available_bytes / GiB:.2f} GiB free "
            f"for pool '{pool_id}'; use a smaller or more quantised model, fewer slots or a smaller ctx, "
            "or give the pool a larger GPU"
        )


def available_memory(num_gpus: float) -> tuple[Optional[int], str]:
    """Free memory where the model will live: the granted GPUs' VRAM, or host RAM on CPU."""
    if num_gpus > 0:
        return _free_vram(), "the pool's GPU memory"
    return _host_available(), "host memory"


def _host_available() -> Optional[int]:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _free_vram() -> Optional[int]:
    """Free VRAM summed over the visible GPUs (NVML), or None when it cannot be read."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        indices = [int(i) for i in visible.split(",") if i.strip().isdigit()] if visible else \
            list(range(pynvml.nvmlDeviceGetCount()))
        return sum(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).free for i in indices)
    except Exception:  # no driver, no device: unknown
        return None
