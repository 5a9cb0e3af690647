"""Reading a configuration (from a dict or a YAML file, errors naming the bad key's path)
and the start-up checks made against it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import ValidationError

from orch.api.errors import field_path
from orch.config.base import ConfigError, project_root
from orch.config.schema import OrchConfig
from orch.core.net import is_loopback


def _path(loc: tuple[Union[str, int], ...]) -> str:
    return field_path(loc) or "(top level)"


def _explain(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        loc = _path(tuple(p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-"))))
        if item["type"] == "extra_forbidden":
            lines.append(f"{source}: {loc}: unknown key")
        elif item["type"] == "missing":
            lines.append(f"{source}: {loc}: required key is missing")
        else:
            msg = item["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "config") -> OrchConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with a 'pools' list")
    try:
        return OrchConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, source)) from None


def find_config_file(path: Union[str, Path]) -> Path:
    """Locate a config file: as given, then under $ORCH_HOME, then under the project root."""
    candidate = Path(path)
    if candidate.is_absolute():
        if candidate.is_file():
            return candidate
        raise ConfigError(f"config file {candidate} does not exist")
    bases = [Path.cwd()]
    if os.environ.get("ORCH_HOME"):
        bases.append(Path(os.environ["ORCH_HOME"]))
    bases.append(project_root())
    for base in bases:
        if (base / candidate).is_file():
            return (base / candidate).resolve()
    raise ConfigError(f"config file {path} not found in " + ", ".join(str(b) for b in bases))


def load_config(path: Union[str, Path]) -> OrchConfig:
    file = find_config_file(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from None
    return parse_config(data, str(file))


def check_bind_auth(config: OrchConfig, bind_host: str) -> None:
    """The auth seam's start-up rule: beyond loopback, only with a bearer token."""
    if not is_loopback(bind_host) and config.server.auth_token is None:
        raise ConfigError(
            f"the service binds {bind_host}, which is reachable beyond this machine, and no bearer token is "
            "configured; set server.auth_token_env to the name of an environment variable holding a token "
            "(at least 16 characters), or bind 127.0.0.1"
        )


def to_wire(config: OrchConfig) -> dict[str, Any]:
    """The config as a plain dict for Ray actors and Serve replicas, secrets included."""
    return config.model_dump(mode="json", context={"reveal_secrets": True})


def check_gpu_capacity(config: OrchConfig, cluster_gpus: float) -> None:
    """GPU-only policy at start-up: fail fast when a pool wants GPUs the cluster lacks."""
    for pool in config.pools:
        if pool.num_gpus > cluster_gpus:
            raise ConfigError(
                f"pool '{pool.id}' asks for {pool.num_gpus:g} GPU(s) but the Ray cluster has "
                f"{cluster_gpus:g}; start Ray where GPUs are visible, or set num_gpus: 0 with "
                "allow_cpu: true to run this pool on CPU"
            )
    wanted = sum(pool.num_gpus for pool in config.pools)
    if wanted > cluster_gpus:
        raise ConfigError(
            f"the pools ask for {wanted:g} GPUs in all but the Ray cluster has {cluster_gpus:g}; "
            "remove pools or lower their num_gpus"
        )
