"""The ``tenants`` section: the declared tenants (their fair-queueing weights) and where the
API keys are kept.

Tenants are declared so that per-tenant metrics have bounded cardinality and a key can only
name a tenant the operator knows. ``default`` (requests without a key) and ``admin`` (the
bootstrap token) always exist.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from orch.api.tasks import ID_PATTERN
from orch.config.base import Strict

#: Tenants that exist without being declared.
BUILTIN_TENANTS = ("default", "admin")


class TenantConfig(Strict):
    id: str = Field(pattern=ID_PATTERN, max_length=64)
    #: Share of a saturated pool this tenant gets against the others (weighted fair queueing);
    #: a key's own weight, when set, wins.
    weight: float = Field(default=1.0, gt=0, le=1000)


class TenantsConfig(Strict):
    declared: list[TenantConfig] = Field(default_factory=list, max_length=1000)
    #: The sqlite file of the API keys (salted hashes only); relative paths are taken from the
    #: directory the service is started in.
    key_store: str = Field(default=".runtime/keys/keys.sqlite", validate_default=True, min_length=1)

    @field_validator("key_store")
    @classmethod
    def _absolute(cls, value: str) -> str:
        return str(Path(value).expanduser().resolve())

    @model_validator(mode="after")
    def _unique(self) -> "TenantsConfig":
        seen: set[str] = set()
        for tenant in self.declared:
            if tenant.id in seen:
                raise ValueError(f"tenant '{tenant.id}' is declared twice; tenant ids must be unique")
            seen.add(tenant.id)
        return self

    def names(self) -> tuple[str, ...]:
        """Every tenant a key may name: the built-in ones, then the declared ones."""
        return BUILTIN_TENANTS + tuple(t.id for t in self.declared if t.id not in BUILTIN_TENANTS)

    def weight(self, tenant: str) -> float:
        for declared in self.declared:
            if declared.id == tenant:
                return declared.weight
        return 1.0
