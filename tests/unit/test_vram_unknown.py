"""A GPU pool whose VRAM cannot be known (no NVML, no declared size) reports it as unknown,
not as zero: the snapshot says null and the Prometheus text leaves the pool's VRAM out."""

from __future__ import annotations

import pytest

from orch.api.pools import PoolView
from orch.core import capacity
from orch.core.capacity import GiB
from orch.observability.exposition import render
from orch.pools.manager import PoolManager
from tests.conftest import mock_pool_config


@pytest.fixture(autouse=True)
def no_nvml(monkeypatch):
    monkeypatch.setattr(capacity, "_vram", lambda: None)


def test_a_gpu_pool_without_nvml_or_a_declared_size_reports_unknown_vram():
    unknown = PoolManager(mock_pool_config("g", num_gpus=1, allow_cpu=False)).snapshot()
    assert unknown.vram_total_bytes is None and unknown.vram_free_bytes is None
    declared = PoolManager(mock_pool_config("d", num_gpus=1, allow_cpu=False, gpu_memory_bytes=8 * GiB)).snapshot()
    assert declared.vram_total_bytes == 8 * GiB and declared.vram_free_bytes is not None
    cpu = PoolManager(mock_pool_config("c")).snapshot()
    assert (cpu.vram_total_bytes, cpu.vram_free_bytes) == (0, 0)


def view(pool_id: str, total, free) -> PoolView:
    return PoolView(pool_id=pool_id, engine="mock", model_ref=f"mock-{pool_id}", ready=True, device_mask="0",
                    vram_total_bytes=total, vram_free_bytes=free)


def test_unknown_vram_is_left_out_of_the_exposition():
    text = render({"g": view("g", None, None), "n": view("n", 10 * GiB, 4 * GiB), "z": view("z", 0, 0)},
                  {}, {}).decode()
    used = {line.split('pool_id="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith("vram_used_bytes{")}
    assert used == {"n": 6 * GiB, "z": 0.0}
    assert 'slots_total{' in text and 'pool_id="g"' in text  # the pool itself is still reported
