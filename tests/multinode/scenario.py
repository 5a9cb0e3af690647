"""A simulated multi-node cluster (ray.cluster_utils) with fake GPUs, driven end to end.

Run as a separate process by test_multinode.py (it needs its own Ray cluster). Prints one
JSON line with what it observed; exits non-zero on any failed expectation.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import httpx  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.state import list_actors  # noqa: E402

from orch.config import parse_config  # noqa: E402
from orch.pools.spawn import create_pool_actor, group_name, remove_pool_group  # noqa: E402
from orch.pools.supervisor import shutdown_pools  # noqa: E402
from ray.util.placement_group import get_placement_group, placement_group_table  # noqa: E402
from orch.serve.deployment import build_application  # noqa: E402

NAMESPACE = "orch-multinode"
GIB = 1024**3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_of(pool_id: str) -> str:
    for actor in list_actors(filters=[("name", "=", f"orch-pool:{pool_id}"), ("state", "=", "ALIVE")]):
        return actor.node_id
    return ""


def wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def main() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    gpu_a = cluster.add_node(num_cpus=1, num_gpus=1)
    gpu_b = cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address, namespace="serve", log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    pool = {"engine": "mock", "model": "mock-model", "num_gpus": 1, "num_cpus": 0.5,
            "engine_options": {"tokens_per_s": 500}}
    config = parse_config({
        "version": 1, "namespace": NAMESPACE,
        "server": {"replica_num_cpus": 0.1},
        "supervision": {"backoff_base_s": 0.2, "backoff_max_s": 1.0},
        # Mixed GPUs: no NVML here, so each pool declares its GPU's size.
        "pools": [dict(pool, id="pool-a", gpu_memory_bytes=24 * GIB), dict(pool, id="pool-b", gpu_memory_bytes=80 * GIB)],
    })
    observed: dict = {}
    try:
        serve.run(build_application(config), name="orch-mn", route_prefix="/")
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        wait(lambda: client.get("/readyz").status_code == 200 and all(
            client.get(f"/v2/pools/{p}/health").json()["ready"] for p in ("pool-a", "pool-b")), 90, "pools ready")

        gpu_nodes = {gpu_a.node_id, gpu_b.node_id}
        placed = {p: node_of(p) for p in ("pool-a", "pool-b")}
        observed["placed"] = placed
        assert set(placed.values()) == gpu_nodes, f"pools are not on the GPU nodes: {placed}"

        # Each pool reports the GPU Ray granted it and its VRAM.
        health = {p: client.get(f"/v2/pools/{p}/health").json()["metrics"] for p in ("pool-a", "pool-b")}
        observed["device_masks"] = {p: h["device_mask"] for p, h in health.items()}
        observed["vram_total"] = {p: h["vram_total_bytes"] // GIB for p, h in health.items()}
        assert all(mask is not None for mask in observed["device_masks"].values()), observed
        assert observed["vram_total"] == {"pool-a": 24, "pool-b": 80}, observed

        # The ingress places across nodes: the larger free GPU first, then whichever can start.
        order = []
        for n in range(6):
            admitted = client.post("/v2/tasks", json={"prompt": f"task {n}", "max_tokens": 200})
            assert admitted.status_code == 202, admitted.text
            order.append(admitted.json()["pool_id"])
        observed["first"] = order[0]
        observed["used"] = sorted(set(order))
        assert order[0] == "pool-b", order  # most free VRAM
        assert set(order) == {"pool-a", "pool-b"}, order

        # A node dies: its pool comes back on a node that has a free GPU.
        gpu_c = cluster.add_node(num_cpus=1, num_gpus=1)
        victim = next(p for p, node in placed.items() if node == gpu_a.node_id)
        cluster.remove_node(gpu_a)
        wait(lambda: node_of(victim) == gpu_c.node_id and client.get(f"/v2/pools/{victim}/health").json()["ready"],
             120, f"{victim} restarted on the new node")
        observed["restarted_on"] = node_of(victim)
        after = client.post("/v2/tasks", json={"prompt": "after", "max_tokens": 5,
                                               "placement": {"pin_pool_id": victim}})
        assert after.status_code == 202, after.text
        with client.stream("GET", f"/v2/tasks/{after.json()['task_id']}/events") as stream:
            assert "event: end" in "".join(stream.iter_text())
        # A tensor-parallel vLLM pool runs in a placement group of one-GPU bundles; its
        # actor holds no GPU itself (vLLM's workers take theirs from the group).
        cluster.add_node(num_cpus=1, num_gpus=2)
        tp = parse_config({"version": 1, "namespace": NAMESPACE, "pools": [{
            "id": "tp", "engine": "vllm", "model": "file:/models/not-loaded-here", "num_gpus": 2, "num_cpus": 0.5,
            "engine_options": {"tensor_parallel_size": 2}}]})
        actor = create_pool_actor(tp.pools[0], tp)
        group_id, actor_gpus = ray.get(actor.__ray_call__.remote(
            lambda self: (ray.get_runtime_context().get_placement_group_id(), ray.get_gpu_ids())), timeout=60)
        table = placement_group_table(get_placement_group(group_name("tp", NAMESPACE)))
        observed["tp_group"] = {"bundles": list(table["bundles"].values()), "strategy": table["strategy"],
                                "actor_in_group": group_id == table["placement_group_id"], "actor_gpus": actor_gpus}
        assert observed["tp_group"]["actor_in_group"] and actor_gpus == [], observed["tp_group"]
        assert observed["tp_group"]["bundles"] == [{"GPU": 1.0, "CPU": 0.5}, {"GPU": 1.0}], observed["tp_group"]
        ray.kill(actor, no_restart=True)
        assert remove_pool_group("tp", NAMESPACE)
        observed["ok"] = True
    finally:
        try:
            serve.delete("orch-mn")
            shutdown_pools(config)
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
    print(json.dumps(observed))


if __name__ == "__main__":
    try:
        main()
    except AssertionError as exc:
        print(json.dumps({"ok": False, "error": str(exc)}))
        sys.exit(1)
