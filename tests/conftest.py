"""Shared fixtures: one local Ray instance and one Serve HTTP proxy per test session."""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable, Iterable, Iterator

import httpx
import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        try:
            from ray import serve

            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def serve_port(ray_session) -> int:
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": HOST, "port": port})
    return port


def home_config(**pool_overrides: Any) -> dict[str, Any]:
    """configs/home.yaml as a dict, with the default pool's fields overridden. Its pool has
    one slot unless ``slots`` says otherwise (home.yaml's 8 run together, and the queueing,
    backpressure and fault tests need a slot that is busy); tests of the shipped default
    itself read home.yaml (tests/e2e)."""
    import yaml

    from orch.config import project_root

    data = yaml.safe_load((project_root() / "configs" / "home.yaml").read_text())
    data.pop("namespace", None)  # each deployment gets its own (see ``deploy``)
    pool = data["pools"][0]
    pool["slots"] = 1
    for key, value in pool_overrides.items():
        pool[key] = value
    return data


def openai_sdk(client: httpx.Client, timeout_s: float = 60.0):
    """The official openai client on a deployed app's /v1 (no retries: a test sees every answer)."""
    import openai

    return openai.OpenAI(base_url=f"{str(client.base_url).rstrip('/')}/v1", api_key="unused", max_retries=0,
                         timeout=timeout_s)


def wait_for(predicate: Callable[[], Any], timeout_s: float = 30.0, every_s: float = 0.1) -> Any:
    """The predicate's first truthy value, polled every ``every_s`` for at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(every_s)
    raise AssertionError(f"condition not met within {timeout_s}s (last: {last!r})")


async def manager_events(manager: Any, task_id: str, budget_s: float = 20.0) -> list[tuple[int, str, dict]]:
    """A task's whole event stream, read from a PoolManager the way the ingress polls it."""
    events, cursor = [], 0
    deadline = time.monotonic() + budget_s
    while time.monotonic() < deadline:
        result = await manager.poll(task_id, cursor, 0.5)
        events.extend(result.events)
        if result.events:
            cursor = result.events[-1][0] + 1
        if result.done:
            return events
    raise AssertionError(f"{task_id} did not end within {budget_s} s: {events}")


def mock_pool_config(pool_id: str, **overrides: Any) -> Any:
    """A mock-engine PoolConfig on CPU, one slot unless overridden."""
    from orch.config import PoolConfig

    fields = dict(id=pool_id, engine="mock", model=f"mock-{pool_id}", num_gpus=0, num_cpus=0, allow_cpu=True,
                  slots=1, engine_options={"tokens_per_s": 200})
    fields.update(overrides)
    return PoolConfig.model_validate(fields)


def wait_ready(client: httpx.Client, timeout_s: float = 60.0, token: str | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    last = None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    while time.monotonic() < deadline:
        last = client.get("/readyz", headers=headers)
        if last.status_code == 200:
            return
        time.sleep(0.1)
    raise AssertionError(f"orchestrator not ready after {timeout_s}s: {last.text if last else 'no answer'}")


@pytest.fixture(scope="module")
def deploy(serve_port) -> Iterator[Callable[..., httpx.Client]]:
    """Deploy the orchestrator app for a config dict under ``route_prefix``; returns a client.

    Each app gets its own Ray namespace (unless the config names one), so apps in one
    test session never share or replace each other's pool actors. At the end of the
    module the apps are deleted and their detached pool actors removed, which keeps the
    small CI machine's CPUs free for the next module.
    """
    from ray import serve

    from orch.config import parse_config
    from orch.pools.supervisor import shutdown_pools
    from orch.serve.deployment import build_application

    deployed: list[tuple[str, Any, httpx.Client]] = []

    def _deploy(config: dict[str, Any], name: str, route_prefix: str = "/", num_replicas: int = 1) -> httpx.Client:
        config = dict(config)
        config.setdefault("namespace", name)
        config.setdefault("server", {})
        config["server"] = {"replica_num_cpus": 0.1, **config["server"]}
        parsed = parse_config(config, name)
        app = build_application(parsed, num_replicas=num_replicas)
        serve.run(app, name=name, route_prefix=route_prefix)
        base = f"http://{HOST}:{serve_port}{route_prefix.rstrip('/')}"
        client = httpx.Client(base_url=base, timeout=httpx.Timeout(60.0))
        deployed.append((name, parsed, client))
        wait_ready(client, token=parsed.server.token())
        return client

    yield _deploy
    for name, parsed, client in deployed:
        client.close()
        serve.delete(name)
        shutdown_pools(parsed)


def read_sse(response: httpx.Response, on_event: Callable[[str, dict], None] | None = None) -> list[tuple[int, str, dict]]:
    """Every event of an SSE response as (id, kind, data)."""
    return parse_sse(response.iter_lines(), on_event)


def parse_sse(lines: Iterable[str], on_event: Callable[[str, dict], None] | None = None) -> list[tuple[int, str, dict]]:
    """SSE lines as (id, kind, data) events; ``on_event`` sees each as it completes."""
    import json

    events: list[tuple[int, str, dict]] = []
    current: dict[str, str] = {}
    for line in lines:
        if line == "":
            if "event" in current:
                item = (int(current.get("id", -1)), current["event"], json.loads(current.get("data", "{}")))
                events.append(item)
                if on_event is not None:
                    on_event(item[1], item[2])
            current = {}
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(": ")
        current[key] = value
    return events
