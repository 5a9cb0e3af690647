"""Ray shell of model provisioning: the plan runs as a task on the node that will hold the
files, reports progress to the catalog actor, and stores its record there itself (so a
provisioning outlives the HTTP request that asked for it).

Tasks ask for no CPU: they wait on the network and the disk, and a download must never queue
behind a busy pool on its target node. Placement is strict (``soft=False``): the files must
land on the node asked for, or the task fails.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orch.provision.errors import ProvisionError
from orch.provision.files import digest_path, remove_managed
from orch.provision.models import ProvisionPlan, ProvisionSettings, execute

log = logging.getLogger("orch.provision")


def current_node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def alive_node_ids() -> set[str]:
    return {node["NodeID"] for node in ray.nodes() if node.get("Alive")}


def on_node(node_id: Optional[str]) -> NodeAffinitySchedulingStrategy:
    """Run on ``node_id`` and nowhere else (the current node when none is given)."""
    return NodeAffinitySchedulingStrategy(node_id=node_id or current_node_id(), soft=False)


def unwrap(exc: BaseException) -> BaseException:
    """The exception a task raised, out of Ray's wrapper."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


@ray.remote(num_cpus=0, max_retries=0)
def _provision(plan_dict: dict[str, Any], settings: ProvisionSettings, catalog: Any) -> dict[str, Any]:
    plan = ProvisionPlan.from_dict(plan_dict)

    def report(done: int, total: Optional[int]) -> None:
        catalog.progress.remote(plan.model_id, done, total)

    try:
        record = execute(plan, settings, report, node_id=current_node_id())
        stored = ray.get(catalog.put.remote(record), timeout=60)
    except BaseException as exc:
        message = exc.message if isinstance(exc, ProvisionError) else f"{exc.__class__.__name__}: {exc}"
        catalog.finish.remote(plan.model_id, message)
        raise
    catalog.finish.remote(plan.model_id, None)
    return stored


def start_provision(plan: ProvisionPlan, settings: ProvisionSettings, catalog: Any,
                    node_id: Optional[str] = None) -> "ray.ObjectRef":
    """Launch the provisioning task; the caller awaits the returned ref (the stored record)."""
    return _provision.options(scheduling_strategy=on_node(node_id)).remote(plan.to_dict(), settings, catalog)


@ray.remote(num_cpus=0, max_retries=0)
def _digest_files(local_path: str) -> Optional[dict[str, Any]]:
    from pathlib import Path

    path = Path(local_path)
    if not path.exists():
        return None
    digest, size = digest_path(path)
    return {"digest": digest, "size_bytes": size}


def start_digest(local_path: str, node_id: Optional[str]) -> "ray.ObjectRef":
    """Recompute a model's digest on the node that holds it (None when its files are gone)."""
    return _digest_files.options(scheduling_strategy=on_node(node_id)).remote(local_path)


@ray.remote(num_cpus=0, max_retries=0)
def _remove_files(local_path: str, model_cache: str) -> list[str]:
    return remove_managed(local_path, model_cache)


def start_removal(local_path: str, model_cache: str, node_id: Optional[str]) -> "ray.ObjectRef":
    """Delete files the catalog downloaded, on the node that holds them."""
    return _remove_files.options(scheduling_strategy=on_node(node_id)).remote(local_path, model_cache)


# --------------------------------------------------------------------------- engines


@ray.remote(num_cpus=0, max_retries=0)
def _probe_runtime_env(module: str) -> str:
    import importlib

    imported = importlib.import_module(module)
    return f"{module} {getattr(imported, '__version__', 'installed')}"


def _verify_env(runtime_env: dict[str, Any], module: str) -> str:
    """Import ``module`` in a task that runs in ``runtime_env`` on this node (Ray builds and
    caches the environment, as it will for the pool actor)."""
    task = _probe_runtime_env.options(runtime_env=runtime_env, scheduling_strategy=on_node(None))
    return ray.get(task.remote(module), timeout=3600)


@ray.remote(max_retries=0)
def _provision_engine(plan_dict: dict[str, Any], settings: Any, catalog: Any) -> dict[str, Any]:
    from orch.provision.engine_run import execute
    from orch.provision.engines import EnginePlan

    plan = EnginePlan.from_dict(plan_dict)
    record = execute(plan, settings, verify_env=_verify_env, node_id=current_node_id())
    return ray.get(catalog.put_handoff.remote(record), timeout=60)


def start_engine_provision(plan: Any, settings: Any, catalog: Any, node_id: Optional[str] = None) -> "ray.ObjectRef":
    """Provision an engine on ``node_id`` and hand it off to the catalog; the ref is the stored
    handoff record. A source build asks Ray for the CPUs it compiles with."""
    cpus = float(settings.build_jobs) if plan.mode == "source" else 0.0
    cpus = min(cpus, max(0.0, float(ray.cluster_resources().get("CPU", 0))))
    return _provision_engine.options(num_cpus=cpus, scheduling_strategy=on_node(node_id)).remote(
        plan.to_dict(), settings, catalog)


@ray.remote(num_cpus=0, max_retries=0)
def _preflight(plan_dict: dict[str, Any]) -> list[dict[str, str]]:
    from orch.provision.engines import EnginePlan, preflight

    return preflight(EnginePlan.from_dict(plan_dict))


def start_preflight(plan: Any, node_id: Optional[str] = None) -> "ray.ObjectRef":
    """Which programs the plan needs are missing on ``node_id``."""
    return _preflight.options(scheduling_strategy=on_node(node_id)).remote(plan.to_dict())
