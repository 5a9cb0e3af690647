"""Will the model fit? Checked before a pool loads, so a model too large for the pool's
VRAM (or, on CPU, the host's free memory) fails fast with the numbers instead of an
out-of-memory crash in the middle of loading. Plain Python, no Ray."""

from __future__ import annotations

import math
import os
import time
from typing import Optional

GiB = 1024**3


class CapacityError(RuntimeError):
    """The model does not fit where the pool would load it; the message gives the numbers.
    The pool reports it as its load failure, like any engine's."""


def check_fits(pool_id: str, needed_bytes: int, available: tuple[Optional[int], str]) -> None:
    """Raise CapacityError when ``needed_bytes`` exceeds what is available (when both are known)."""
    available_bytes, where = available
    if not needed_bytes or available_bytes is None:
        return
    if needed_bytes > available_bytes:
        raise CapacityError(
            f"model needs about {needed_bytes / GiB:.2f} GiB but {where} has {available_bytes / GiB:.2f} GiB free "
            f"for pool '{pool_id}'; use a smaller or more quantised model, fewer slots or a smaller ctx, "
            "or give the pool a larger GPU"
        )


def available_memory(num_gpus: float, declared_per_gpu: Optional[int] = None) -> tuple[Optional[int], str]:
    """Free memory where the model will live: the granted GPUs' VRAM (NVML, else the size
    the config declares), or host RAM on CPU."""
    if num_gpus > 0:
        free = _free_vram()
        if free is None and declared_per_gpu:
            return declared_per_gpu * max(1, math.ceil(num_gpus)), "the pool's GPU memory (as configured)"
        return free, "the pool's GPU memory"
    return _host_available(), "host memory"


class GpuMemory:
    """Total and free VRAM of a pool's GPUs, for the placement snapshot: NVML's numbers for
    the devices Ray granted, else the config's ``gpu_memory_bytes`` per GPU less the loaded
    model's estimate; (0, 0) on CPU; (None, None) on GPUs whose memory is unknown (no NVML,
    no declared size), which placement treats as unknown rather than full. Read at most once
    a second (NVML calls are not free and the snapshot is read several times a second)."""

    def __init__(self, num_gpus: float, declared_per_gpu: Optional[int] = None, max_age_s: float = 1.0) -> None:
        self.gpus = max(1, math.ceil(num_gpus)) if num_gpus > 0 else 0
        self.declared_per_gpu = declared_per_gpu
        self.max_age_s = max_age_s
        self._read_at = -math.inf
        self._measured: Optional[tuple[int, int]] = None

    def read(self, model_bytes: int) -> tuple[Optional[int], Optional[int]]:
        if not self.gpus:
            return 0, 0
        now = time.monotonic()
        if now - self._read_at >= self.max_age_s:
            self._measured = _vram()
            self._read_at = now
        if self._measured is not None:
            return self._measured
        if self.declared_per_gpu:
            total = self.declared_per_gpu * self.gpus
            return total, max(0, total - model_bytes)
        return None, None


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
    measured = _vram()
    return measured[1] if measured is not None else None


def gpu_memory() -> Optional[list[tuple[int, int]]]:
    """(total, free) bytes of each visible GPU (NVML), or None when it cannot be read."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        indices = [int(i) for i in visible.split(",") if i.strip().isdigit()] if visible else \
            list(range(pynvml.nvmlDeviceGetCount()))
        infos = [pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)) for i in indices]
        return [(int(info.total), int(info.free)) for info in infos] or None
    except Exception:  # no driver, no device: unknown
        return None


def _vram() -> Optional[tuple[int, int]]:
    """(total, free) VRAM summed over the visible GPUs (NVML), or None when unreadable."""
    found = gpu_memory()
    return (sum(total for total, _ in found), sum(free for _, free in found)) if found else None
