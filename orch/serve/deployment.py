"""Ray Serve deployment of the ingress, and the application builder used by Serve configs.

``serve run deployments/home.yaml`` imports ``orch.serve.deployment:build`` with
``args: {config: configs/home.yaml}``. The builder loads and checks the config first, so a
bad config or a GPU pool on a cluster without GPUs fails ``serve run`` at once, with the
reason, before any replica starts.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray
from ray import serve
from ray.serve import Application
from ray.serve.exceptions import RayServeException

from orch.artifacts.actor import artifact_actor
from orch.catalog.actor import catalog_actor
from orch.config import ConfigError, OrchConfig, check_bind_auth, check_gpu_capacity, load_config, parse_config, to_wire
from orch.observability.actor import metrics_actor
from orch.observability.logs import configure_logging
from orch.pools.supervisor import ensure_pools
from orch.serve.app import build_app
from orch.serve.registry import PoolRegistry
from orch.serve.state import IngressState
from orch.serve.sessions_gate import SessionsGate
from orch.tenants.actor import start_key_cache

log = logging.getLogger("orch.ingress")

#: Seconds between flushes of a replica's ingress-side counters to the shared totals.
METRICS_FLUSH_S = 1.0


@serve.deployment(
    name="orch-ingress",
    max_ongoing_requests=10_000,
)
@serve.ingress()
class OrchIngress:
    async def __init__(self, config: dict[str, Any]) -> None:
        configure_logging()
        self.config = parse_config(config, "ingress config")
        _check_auth_seam(self.config)
        handles = await asyncio.to_thread(ensure_pools, self.config)
        keys = await start_key_cache(self.config)
        self.state = IngressState(
            self.config,
            PoolRegistry(self.config, handles, self.config.server.snapshot_ttl_s),
            sessions=SessionsGate(self.config.namespace, self.config.sessions),
            artifacts=artifact_actor(self.config.artifacts.root, self.config.namespace),
            extras={"catalog": catalog_actor(self.config.catalog.root, self.config.namespace), "keys": keys},
            metrics=metrics_actor(self.config.namespace),
        )
        self._flusher = asyncio.get_running_loop().create_task(self._flush_counters())

    async def _flush_counters(self) -> None:
        """Send this replica's placement counts to the shared totals about once a second."""
        while True:
            await asyncio.sleep(METRICS_FLUSH_S)
            deltas = self.state.counters.take_deltas()
            if deltas is None:
                continue
            try:
                await self.state.metrics.add.remote(deltas)
            except Exception as exc:  # lost deltas only shift a counter; never stop flushing
                log.warning("metrics flush failed: %s", exc)

    def __serve_build_asgi_app__(self):
        return build_app(self.state)


def build_application(config: OrchConfig, num_replicas: int | None = None) -> Application:
    _check_auth_seam(config)
    if ray.is_initialized():
        check_gpu_capacity(config, ray.cluster_resources().get("GPU", 0))
    return OrchIngress.options(
        num_replicas=num_replicas or config.server.num_replicas,
        ray_actor_options={"num_cpus": config.server.replica_num_cpus},
    ).bind(to_wire(config))


def _check_auth_seam(config: OrchConfig) -> None:
    """Refuse to serve beyond loopback without a token, whether the orchestrator config or
    the Serve proxy's bind address says so."""
    check_bind_auth(config, config.server.host)
    check_bind_auth(config, _proxy_host(config.server.host))


def _proxy_host(configured: str) -> str:
    """The address Serve's HTTP proxy really binds (the Serve config's http_options.host)."""
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client().http_config.host or configured
    except Exception:  # not reachable from here: trust the orchestrator config
        return configured


def build(args: dict[str, Any]) -> Application:
    """Serve application builder: ``args.config`` is the orchestrator config file.

    A bad config is raised as Serve's own RayServeException: Serve fails the build once with
    its one-line message, where any other exception is retried three times, traceback each time.
    """
    try:
        unknown = set(args) - {"config"}
        if unknown:
            raise ConfigError(f"unknown application args: {', '.join(sorted(unknown))}; expected 'config'")
        return build_application(load_config(args.get("config", "configs/home.yaml")))
    except ConfigError as exc:
        raise RayServeException(f"bad orchestrator config: {exc}") from None
