"""Orchestrator configuration: strict schema, YAML loading, GPU policy.

The sections live in ``schema`` (the catalog's and its outbound policy in ``catalog``);
``loading`` reads a dict or a YAML file and holds the start-up checks. Import from here.
"""

from orch.config.base import ConfigError, project_root
from orch.config.catalog import FETCH_SCHEMES, CatalogConfig, OutboundPolicy
from orch.config.loading import (
    check_bind_auth,
    check_gpu_capacity,
    find_config_file,
    load_config,
    parse_config,
    to_wire,
)
from orch.config.schema import (
    POOL_ENGINES,
    ArtifactsConfig,
    OrchConfig,
    PoolConfig,
    QueueConfig,
    ServerConfig,
    SessionBudgetsConfig,
    SessionsConfig,
    SupervisionConfig,
)

__all__ = [
    "FETCH_SCHEMES", "POOL_ENGINES", "ArtifactsConfig", "CatalogConfig", "ConfigError", "OrchConfig",
    "OutboundPolicy", "PoolConfig", "QueueConfig", "ServerConfig", "SessionBudgetsConfig", "SessionsConfig",
    "SupervisionConfig", "check_bind_auth", "check_gpu_capacity", "find_config_file", "load_config",
    "parse_config", "project_root", "to_wire",
]
