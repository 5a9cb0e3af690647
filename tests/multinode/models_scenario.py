"""Models on demand on a simulated multi-node cluster (ray.cluster_utils, fake GPUs): each
GPU node is a budget of its own; loads land on the node with room, and when none has room
the least recently used idle model goes, whichever node holds it.

Run as a separate process by test_models_multinode.py (it needs its own Ray cluster).
Prints one JSON line with what it observed; exits non-zero on any failed expectation.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import httpx  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from orch.config import parse_config  # noqa: E402
from orch.pools.supervisor import shutdown_pools  # noqa: E402
from orch.serve.deployment import build_application  # noqa: E402
from tests.multinode.scenario import free_port, node_of, wait  # noqa: E402

NAMESPACE = "orch-models-mn"
GIB = 1024**3


def model(model_id: str, gib: int) -> dict:
    return {"id": model_id, "ref": f"mock-{model_id}", "engine": "mock", "num_gpus": 1, "num_cpus": 0.25,
            "size_bytes": gib * GIB, "keep_alive": -1, "engine_options": {"tokens_per_s": 0}}


def ask(client: httpx.Client, model_id: str) -> None:
    admitted = client.post("/v2/tasks", json={"prompt": "hi", "max_tokens": 2, "model_ref": model_id})
    assert admitted.status_code == 202, admitted.text
    with client.stream("GET", f"/v2/tasks/{admitted.json()['task_id']}/events") as stream:
        text = "".join(stream.iter_text())
        assert "event: end" in text, text[-500:]


def main() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    big = cluster.add_node(num_cpus=1, num_gpus=1)
    small = cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address, namespace="serve", log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = parse_config({
        "version": 1, "namespace": NAMESPACE, "server": {"replica_num_cpus": 0.1},
        "pools": [{"id": "cpu", "engine": "mock", "model": "mock-cpu", "num_gpus": 0, "num_cpus": 0.1,
                   "allow_cpu": True}],
        "model_set": {"check_every_s": 0.2, "budgets": [
            {"id": "big", "node_id": big.node_id, "gpus": 1, "gpu_memory_bytes": 24 * GIB},
            {"id": "small", "node_id": small.node_id, "gpus": 1, "gpu_memory_bytes": 16 * GIB}],
            "models": [model("x", 20), model("y", 12), model("z", 12)]},
    })
    observed: dict = {}
    try:
        serve.run(build_application(config), name="orch-models-mn", route_prefix="/")
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        wait(lambda: client.get("/readyz").status_code == 200, 90, "ingress ready")
        nodes = {big.node_id: "big", small.node_id: "small"}

        def where() -> dict:
            listed = client.get("/v2/models").json()["models"]
            return {m["id"]: nodes.get(m["node_id"]) if m["loaded"] else None for m in listed}

        ask(client, "x")  # 20 GiB: only the 24 GiB node holds it
        ask(client, "y")  # 12 GiB: the big node has 4 GiB left, so the small one
        observed["after_x_y"] = where()
        assert observed["after_x_y"] == {"x": "big", "y": "small", "z": None}, observed
        assert node_of("x") == big.node_id and node_of("y") == small.node_id, observed
        ask(client, "x")  # x is now the more recently used
        ask(client, "z")  # no room anywhere: y (least recently used) goes, z takes its node
        observed["after_z"] = where()
        assert observed["after_z"] == {"x": "big", "y": None, "z": "small"}, observed
        budgets = {b["id"]: b for b in client.get("/v2/models").json()["budgets"]}
        observed["used_gib"] = {name: b["used_bytes"] // GIB for name, b in budgets.items()}
        assert observed["used_gib"] == {"big": 20, "small": 12}, observed
        observed["ok"] = True
    finally:
        try:
            serve.delete("orch-models-mn")
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
