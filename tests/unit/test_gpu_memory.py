"""VRAM in the placement snapshot and the fit check, where NVML cannot read it (this
machine has no GPU): the size a pool's config declares, less what its model needs."""

from __future__ import annotations

import asyncio

import pytest

from orch.config import PoolConfig
from orch.core import capacity
from orch.core.capacity import GiB, GpuMemory, available_memory
from orch.pools.manager import PoolManager


@pytest.fixture(autouse=True)
def no_nvml(monkeypatch):
    monkeypatch.setattr(capacity, "_vram", lambda: None)


def test_declared_vram_less_the_model_and_nothing_on_cpu():
    memory = GpuMemory(2, declared_per_gpu=24 * GiB)
    assert memory.read(model_bytes=5 * GiB) == (48 * GiB, 43 * GiB)
    assert GpuMemory(0.5, declared_per_gpu=24 * GiB).read(GiB) == (24 * GiB, 23 * GiB)  # a share of one GPU
    assert GpuMemory(0, declared_per_gpu=24 * GiB).read(GiB) == (0, 0)
    assert GpuMemory(1).read(GiB) == (None, None)  # unknown, not "no free VRAM"
    assert available_memory(2, 24 * GiB) == (48 * GiB, "the pool's GPU memory (as configured)")
    assert available_memory(1) == (None, "the pool's GPU memory")


def test_nvml_numbers_win_and_are_read_at_most_once_a_second(monkeypatch):
    reads = []

    def measured():
        reads.append(1)
        return 80 * GiB, 70 * GiB

    monkeypatch.setattr(capacity, "_vram", measured)
    memory = GpuMemory(1, declared_per_gpu=24 * GiB)
    assert [memory.read(GiB) for _ in range(5)] == [(80 * GiB, 70 * GiB)] * 5
    assert len(reads) == 1


def pool(**fields) -> PoolConfig:
    base = dict(id="g", engine="mock", model="mock-gpu", num_gpus=1, slots=1,
                engine_options={"model_bytes": 6 * GiB})
    return PoolConfig.model_validate(dict(base, **fields))


def test_the_snapshot_reports_vram_and_an_oversized_model_fails_fast():
    async def scenario():
        fits = PoolManager(pool(gpu_memory_bytes=24 * GiB))
        fits.device_mask = "3"
        snap = await fits.start()
        await fits.stop()
        too_small = PoolManager(pool(gpu_memory_bytes=4 * GiB))
        refused = await too_small.start()
        await too_small.stop()
        return snap, refused

    snap, refused = asyncio.run(scenario())
    assert snap.ready and snap.device_mask == "3"
    assert snap.vram_total_bytes == 24 * GiB and snap.vram_free_bytes == 18 * GiB
    assert not refused.ready
    assert "needs about 6.00 GiB but the pool's GPU memory (as configured) has 4.00 GiB" in refused.last_error


def test_a_failed_probe_reports_unknown_not_zero():
    manager = PoolManager(pool(gpu_memory_bytes=24 * GiB))

    def broken(model_bytes):
        raise OSError("NVML went away")

    manager.gpu_memory.read = broken
    snap = manager.snapshot()
    assert snap.vram_total_bytes is None and snap.vram_free_bytes is None
