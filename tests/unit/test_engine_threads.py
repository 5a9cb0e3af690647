"""The engine's CPU threads: the config's ``threads``, else the CPUs Ray granted the pool,
and the pool process's ``OMP_NUM_THREADS`` set to match (Ray would set it from num_cpus)."""

from __future__ import annotations

import pytest

from orch.config import parse_config
from orch.engines import granted_cpus, llamacpp_threads
from tests.conftest import home_config


def pool(**overrides):
    return parse_config(home_config(**overrides)).pool("default")


def test_threads_come_from_the_config_else_the_granted_cpus():
    assert llamacpp_threads(pool(threads=3, num_cpus=1)) == 3
    # Outside a Ray worker nothing is granted: the pool's num_cpus, rounded, at least 1.
    assert granted_cpus() is None
    assert llamacpp_threads(pool(threads=None, num_cpus=2)) == 2
    assert llamacpp_threads(pool(threads=None, num_cpus=0.25)) == 1


def test_the_granted_cpus_win_over_num_cpus_inside_a_worker(monkeypatch):
    import orch.engines as engines

    monkeypatch.setattr(engines, "granted_cpus", lambda: 4.0)
    assert engines.llamacpp_threads(pool(threads=None, num_cpus=1)) == 4
    assert engines.llamacpp_threads(pool(threads=2, num_cpus=1)) == 2


@pytest.mark.parametrize("engine,overrides,expected", [
    ("llamacpp", {"threads": 2, "num_cpus": 1}, {"OMP_NUM_THREADS": "2"}),
    ("llamacpp", {"threads": None, "num_cpus": 3}, {"OMP_NUM_THREADS": "3"}),
    ("external", {"threads": None, "num_cpus": 1}, {}),
])
def test_the_pool_process_gets_openmp_threads_to_match(engine, overrides, expected):
    from orch.pools.spawn import engine_threads_env

    config = pool(**overrides)
    if engine != "llamacpp":
        config = config.model_copy(update={"engine": type(config.engine)(engine)})
    assert engine_threads_env(config) == expected


def test_the_pool_actor_is_created_with_that_environment(monkeypatch):
    """The actor's runtime_env carries OMP_NUM_THREADS, merged under a handed-off engine's own."""
    from orch.pools import spawn

    captured = {}

    class FakeActor:
        @staticmethod
        def options(**options):
            captured.update(options)
            return FakeActor

        @staticmethod
        def remote(*args):
            return "handle"

    monkeypatch.setattr(spawn, "PoolActor", FakeActor)
    config = parse_config(home_config(threads=2))
    spawn.create_pool_actor(config.pool("default"), config)
    assert captured["runtime_env"] == {"env_vars": {"OMP_NUM_THREADS": "2"}}
    spawn.create_pool_actor(config.pool("default"), config,
                            runtime_env={"pip": ["x"], "env_vars": {"OMP_NUM_THREADS": "5", "A": "1"}})
    assert captured["runtime_env"] == {"pip": ["x"], "env_vars": {"OMP_NUM_THREADS": "5", "A": "1"}}
