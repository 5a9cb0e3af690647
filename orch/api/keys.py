"""API keys: who a request comes from (``Principal``), what a key may do, and the bodies of
the ``/v2/keys`` admin endpoints.

A key is ``orch_<key_id>_<secret>``: the id is public (it names the key in URLs, logs and
usage), the secret is shown once, at creation or rotation, and kept only as a salted hash.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from orch.api.tasks import ID_PATTERN, Priority

#: Scopes a key can hold: ``infer`` (tasks, sessions, the OpenAI routes, its own artifacts),
#: ``catalog`` (catalog and provisioning), ``admin`` (pool control, keys, operator views).
SCOPES = ("infer", "catalog", "admin")
Scope = Literal["infer", "catalog", "admin"]

#: Public ids are this many hex characters.
KEY_ID_HEX = 12


class KeyLimits(BaseModel):
    """Limits of one key; a limit left out is not limited (enforced before enqueue)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rpm: Optional[int] = Field(default=None, ge=1, description="requests admitted per minute")
    tpm: Optional[int] = Field(default=None, ge=1, description="prompt + completion tokens per minute")
    max_concurrent: Optional[int] = Field(default=None, ge=1, description="tasks queued or running at once")
    budget_tokens: Optional[int] = Field(default=None, ge=1, description="tokens per budget period")
    budget_period: Optional[Literal["day", "month"]] = None


@dataclass(frozen=True)
class Principal:
    """Who a request comes from, as the key store says (None in the request state: auth is
    off or the loopback bypass let it in; it then counts as tenant ``default``, unlimited)."""

    key_id: str
    tenant: str
    scopes: frozenset[str]
    #: Models (``model_ref`` or OpenAI ``model``) the key may use; None: any.
    models: Optional[tuple[str, ...]] = None
    #: ``interactive`` allows both priorities, ``batch`` allows batch work only.
    priority_ceiling: Priority = Priority.interactive
    limits: KeyLimits = field(default_factory=KeyLimits)
    weight: float = 1.0
    #: The server's configured token (acts as an admin key of tenant ``admin``).
    bootstrap: bool = False

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes


class KeyCreate(BaseModel):
    """Body of ``POST /v2/keys``."""

    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(pattern=ID_PATTERN, max_length=64, description="a tenant declared in the config")
    name: str = Field(default="", max_length=200, description="free text, stored verbatim")
    scopes: list[Scope] = Field(default_factory=lambda: ["infer"], min_length=1)
    models: Optional[list[str]] = Field(default=None, max_length=256, description="models it may use; null: any")
    priority_ceiling: Priority = Priority.interactive
    limits: KeyLimits = Field(default_factory=KeyLimits)
    weight: Optional[float] = Field(default=None, gt=0, le=1000, description="fair-queueing weight; null: the tenant's")
    metadata: dict[str, Any] = Field(default_factory=dict, description="free JSON, stored verbatim")

    @field_validator("scopes")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        return sorted(set(value), key=SCOPES.index)

    @field_validator("models")
    @classmethod
    def _named(cls, value: Optional[list[str]]) -> Optional[list[str]]:
        if value is not None and any(not m or len(m) > 512 for m in value):
            raise ValueError("each model must be a non-empty string of at most 512 characters")
        return value


class KeyInfo(BaseModel):
    """A key as listed: never its secret nor its hash."""

    key_id: str
    tenant: str
    name: str
    scopes: list[str]
    models: Optional[list[str]] = None
    priority_ceiling: Priority
    limits: KeyLimits
    weight: Optional[float] = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: float
    revoked_at: Optional[float] = None
    rotated_at: Optional[float] = None


class KeyCreated(KeyInfo):
    """A key with its secret: answered once, by create and rotate."""

    key: str = Field(description="the whole key (orch_<key_id>_<secret>); shown only this once")


class KeyList(BaseModel):
    """Answer of ``GET /v2/keys``."""

    keys: list[KeyInfo]


def principal_from(info: dict[str, Any], tenant_weight: float = 1.0) -> Principal:
    """The principal of a key record (a ``KeyInfo``-shaped dict)."""
    models = info.get("models")
    weight = info.get("weight")
    return Principal(
        key_id=info["key_id"], tenant=info["tenant"], scopes=frozenset(info["scopes"]),
        models=tuple(models) if models is not None else None,
        priority_ceiling=Priority(info.get("priority_ceiling", "interactive")),
        limits=KeyLimits.model_validate(info.get("limits") or {}),
        weight=float(weight) if weight is not None else tenant_weight,
    )
