"""Pools on a real Ray instance: GPU-only policy, unready pools, pins, and task location
from any ingress replica."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest
import ray

from orch.config import ConfigError, parse_config
from orch.pools.supervisor import ensure_pools
from orch.serve.deployment import build_application
from orch.serve.registry import PoolRegistry
from tests.conftest import home_config, read_sse, wait_for

pytestmark = pytest.mark.integration


def test_gpu_pool_without_gpus_fails_fast(ray_session):
    config = home_config(num_gpus=1, allow_cpu=False)
    config["namespace"] = "orch-it-gpu"
    parsed = parse_config(config)
    assert ray.cluster_resources().get("GPU", 0) == 0
    with pytest.raises(ConfigError, match=r"asks for 1 GPU\(s\) but the Ray cluster has 0"):
        build_application(parsed)
    with pytest.raises(ConfigError, match="GPU"):
        ensure_pools(parsed)
    with pytest.raises(ValueError):
        ray.get_actor("orch-pool:default", namespace="orch-it-gpu")


def test_cpu_pool_must_opt_in():
    config = home_config(allow_cpu=False)
    with pytest.raises(ConfigError, match="allow_cpu: true"):
        parse_config(config)


@pytest.fixture(scope="module")
def two_pools(deploy):
    config = home_config()
    broken = dict(config["pools"][0], id="broken", model="file:/nonexistent/model.gguf", model_aliases=[])
    config["pools"].append(broken)
    config["pools"][0]["niceness"] = 0  # the broken pool keeps Ray's
    config["namespace"] = "orch-it-pools"
    return deploy(config, name="orch-pools", route_prefix="/pools", num_replicas=2), parse_config(config)


def test_unready_pool_reports_cause_and_pin_never_falls_back(two_pools):
    client, _ = two_pools
    # The broken pool's cause appears once its actor has tried to load (asynchronously, and
    # each ingress replica sees it at its next snapshot refresh). With two replicas, the one
    # answering may not have seen the default pool turn ready yet: wait for a view with both.
    ready = wait_for(lambda: (r := client.get("/readyz").json())["pools"]["broken"]["last_error"]
                     and r["pools"]["default"]["ready"] and r, 30, 0.2)
    assert ready["pools"]["broken"]["ready"] is False
    assert "no file at /nonexistent/model.gguf" in ready["pools"]["broken"]["last_error"]

    pinned = client.post(
        "/v2/tasks", json={"prompt": "Once upon a time", "max_tokens": 4, "placement": {"pin_pool_id": "broken"}}
    )
    assert pinned.status_code == 503
    body = pinned.json()
    assert body["code"] == "POOL_UNREADY" and body["pool_id"] == "broken" and body["retriable"] is True
    assert "never falls back" in body["message"]
    assert int(pinned.headers["Retry-After"]) >= 1

    placed = client.post("/v2/tasks", json={"prompt": "Once upon a time", "max_tokens": 4})
    assert placed.status_code == 202 and placed.json()["pool_id"] == "default"


def test_any_replica_can_stream_and_cancel(two_pools):
    client, config = two_pools
    task_ids = []
    for n in range(6):
        response = client.post("/v2/tasks", json={"prompt": "Once upon a time", "max_tokens": 6, "seed": n})
        assert response.status_code == 202
        task_ids.append(response.json()["task_id"])
    # Through the proxy (two replicas, so some streams land on the replica that did not admit).
    for task_id in task_ids:
        with client.stream("GET", f"/v2/tasks/{task_id}/events") as stream:
            assert read_sse(stream)[-1][1] == "end"

    # A replica that never saw the task (an empty registry) finds it by asking the pools.
    async def from_a_fresh_replica():
        registry = PoolRegistry(config, {}, ttl_s=0.25)
        located = await registry.locate(task_ids[0])
        polled = await registry.pools.poll(located, task_ids[0], 0, 0.0)
        missing = await registry.locate("never-submitted")
        return located, polled, missing

    located, polled, missing = asyncio.run(from_a_fresh_replica())
    assert located == "default"
    assert polled.done and polled.events[-1][1] == "end"
    assert missing is None


def _may_raise_priority() -> bool:
    import resource

    return os.geteuid() == 0 or resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is read from /proc")
def test_the_pool_process_runs_at_its_niceness_not_rays(two_pools):
    """Ray starts workers at niceness 15; a pool set to 0 runs there, engine threads included."""
    if not _may_raise_priority():
        pytest.skip("this user may not raise a process's priority (the pool logs how to start Ray instead)")
    client, _ = two_pools
    response = client.post("/v2/tasks", json={"prompt": "Once upon a time", "max_tokens": 4, "seed": 3})
    with client.stream("GET", f"/v2/tasks/{response.json()['task_id']}/events") as stream:
        assert read_sse(stream)[-1][1] == "end"  # llama.cpp's decode threads exist by now
    pool = ray.get_actor("orch-pool:default", namespace="orch-it-pools")
    pid = ray.get(pool.__ray_call__.remote(lambda _self: os.getpid()), timeout=30)
    niceness = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            niceness[int(tid)] = os.getpriority(os.PRIO_PROCESS, int(tid))
        except ProcessLookupError:
            continue
    assert len(niceness) > 10 and set(niceness.values()) == {0}, niceness
    ingress_like = ray.get(ray.remote(lambda: os.getpriority(os.PRIO_PROCESS, 0)).options(num_cpus=0).remote())
    assert ingress_like == 15  # what Ray gives every other worker, so the check above is not vacuous
    unset = ray.get_actor("orch-pool:broken", namespace="orch-it-pools")  # niceness not set: Ray's
    assert ray.get(unset.__ray_call__.remote(lambda _self: os.getpriority(os.PRIO_PROCESS, 0)), timeout=30) == 15
